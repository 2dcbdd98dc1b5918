//! Partial rotary embedding on the tail of a vector, with interleaved pairs, and YaRN.
//!
//! Only the last `r` channels rotate; pair ℓ is channels (D−r+2ℓ, D−r+2ℓ+1) and turns by
//! φ = p·ω_ℓ (dsv4-arch.md §3.4). Sliding layers use θ = rope_theta without YaRN; compressed
//! layers use compress_rope_theta with YaRN (attention factor 1: cos/sin are not scaled).

use crate::config::RopeParams;

/// Per-pair angular frequencies ω_ℓ of one RoPE flavour, for a rotated width `r`.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f64>,
}

impl RopeTable {
    pub fn new(params: &RopeParams, r: usize) -> RopeTable {
        let theta = params.theta as f64;
        let half = r / 2;
        let default: Vec<f64> = (0..half)
            .map(|l| 1.0 / theta.powf(2.0 * l as f64 / r as f64))
            .collect();
        let inv_freq = match params.yarn {
            None => default,
            Some(y) => {
                // transformers' _compute_yarn_parameters with truncate = True.
                let dcorr = |beta: f64| {
                    r as f64 * (y.original_ctx as f64 / (2.0 * std::f64::consts::PI * beta)).ln()
                        / (2.0 * theta.ln())
                };
                let lo = dcorr(y.beta_fast as f64).floor().max(0.0);
                let mut hi = dcorr(y.beta_slow as f64).ceil().min(r as f64 - 1.0);
                if lo == hi {
                    hi += 0.001;
                }
                let s = y.factor as f64;
                default
                    .iter()
                    .enumerate()
                    .map(|(l, &w)| {
                        let ramp = ((l as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        w * extrapolation + (w / s) * (1.0 - extrapolation)
                    })
                    .collect()
            }
        };
        RopeTable { inv_freq }
    }

    /// Rotated width r.
    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Rotates the last `r` channels of `x` by position `pos` (or by −pos when `inverse`).
    pub fn rotate_tail(&self, x: &mut [f32], pos: usize, inverse: bool) {
        let r = self.dim();
        let start = x.len() - r;
        let sign = if inverse { -1.0 } else { 1.0 };
        for (l, pair) in x[start..].chunks_exact_mut(2).enumerate() {
            let phi = pos as f64 * self.inv_freq[l];
            let (s, c) = phi.sin_cos();
            let (s, c) = ((sign * s) as f32, c as f32);
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }

    /// Rotates the tail of every `width`-wide chunk of `x` (e.g. every head of a query).
    pub fn rotate_tails(&self, x: &mut [f32], width: usize, pos: usize, inverse: bool) {
        for head in x.chunks_exact_mut(width) {
            self.rotate_tail(head, pos, inverse);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Yarn;

    fn flash_yarn() -> RopeParams {
        RopeParams {
            theta: 160000.0,
            yarn: Some(Yarn {
                factor: 16.0,
                original_ctx: 65536,
                beta_fast: 32.0,
                beta_slow: 1.0,
            }),
        }
    }

    #[test]
    fn plain_frequencies_follow_the_formula() {
        let t = RopeTable::new(
            &RopeParams {
                theta: 10000.0,
                yarn: None,
            },
            16,
        );
        for (l, w) in t.inv_freq().iter().enumerate() {
            assert!((w - 10000f64.powf(-(2.0 * l as f64) / 16.0)).abs() < 1e-15);
        }
    }

    #[test]
    fn flash_yarn_ramp_is_15_to_25() {
        // dsv4-arch §3.4: for r = 64, θ = 160000 the ramp runs from pair 15 to pair 25.
        let t = RopeTable::new(&flash_yarn(), 64);
        let plain = RopeTable::new(
            &RopeParams {
                theta: 160000.0,
                yarn: None,
            },
            64,
        );
        for l in 0..32 {
            let (y, p) = (t.inv_freq()[l], plain.inv_freq()[l]);
            if l <= 15 {
                assert_eq!(y, p, "pair {l} keeps its frequency");
            } else if l >= 25 {
                assert!((y - p / 16.0).abs() < 1e-18, "pair {l} is interpolated");
            } else {
                let ramp = (l as f64 - 15.0) / 10.0;
                assert!((y - (p * (1.0 - ramp) + p / 16.0 * ramp)).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn small_yarn_ramp_is_3_to_7() {
        // dsv4-arch §3.4: for r = 16 the values are lo = 3 and hi = 7.
        let t = RopeTable::new(&flash_yarn(), 16);
        let plain = RopeTable::new(
            &RopeParams {
                theta: 160000.0,
                yarn: None,
            },
            16,
        );
        assert_eq!(t.inv_freq()[3], plain.inv_freq()[3]);
        assert!((t.inv_freq()[7] - plain.inv_freq()[7] / 16.0).abs() < 1e-18);
        let w5 = plain.inv_freq()[5] * 0.5 + plain.inv_freq()[5] / 16.0 * 0.5;
        assert!((t.inv_freq()[5] - w5).abs() < 1e-15);
    }

    #[test]
    fn rotation_is_interleaved_on_the_tail_and_inverts() {
        let t = RopeTable::new(
            &RopeParams {
                theta: 10000.0,
                yarn: None,
            },
            4,
        );
        let x = vec![9.0f32, 1.0, 0.0, 1.0, 0.0];
        let mut y = x.clone();
        t.rotate_tail(&mut y, 3, false);
        assert_eq!(y[0], 9.0, "the nope channel is untouched");
        // Pair 0 (channels 1, 2) turns by 3 rad: (cos 3, sin 3).
        assert!((y[1] - 3f32.cos()).abs() < 1e-6 && (y[2] - 3f32.sin()).abs() < 1e-6);
        // Pair 1 (channels 3, 4) turns by 3·10000^(-1/2) = 0.03 rad.
        assert!((y[3] - 0.03f32.cos()).abs() < 1e-6 && (y[4] - 0.03f32.sin()).abs() < 1e-6);
        t.rotate_tail(&mut y, 3, true);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
