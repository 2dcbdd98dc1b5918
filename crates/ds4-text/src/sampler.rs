//! Token sampling exactly as ds4 does it (ds4-spec.md §8): xorshift64* RNG, temperature,
//! min-p, top-p and top-k with ds4's two code paths, all in f32 like the original.
//!
//! - T ≤ 0: argmax (the first maximum).
//! - top_k ≤ 0 and top_p = 1: weights p_i = exp((l_i − l_max)/T) over finite logits, those below
//!   min_p dropped, one draw r = U·Σp walked **in vocab order**.
//! - otherwise: candidates sorted by logit (all of them, or the top min(k, 1024)); kept while
//!   p/Σ ≥ min_p·p_top/Σ and until the cumulative share reaches top_p (the crossing token is
//!   kept); one draw walked in sorted order.
//!
//! Also: [`top_logprobs`] for `--dump-logprobs`, and [`DsmlDecodeTracker`] (re-exported), which
//! says when DSML structure must be sampled greedily.

pub use crate::dsml_forcing::{DsmlDecodeState, DsmlDecodeTracker};
/// Greedy picks live with the model's session interface ([`ds4_model::backend::Session::decode_greedy`]
/// makes the same pick on a backend's device).
pub use ds4_model::greedy::{argmax, argmax_excluding};

/// ds4's defaults: T 1, top_p 1, min_p 0.05, top_k 0 (off).
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TOP_P: f32 = 1.0;
pub const DEFAULT_MIN_P: f32 = 0.05;
pub const DEFAULT_TOP_K: i32 = 0;
/// top_k is capped here (ds4's fixed candidate buffer).
pub const MAX_TOP_K: usize = 1024;

/// Sampling settings of one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerParams {
    pub temperature: f32,
    pub top_p: f32,
    /// ≤ 0: off.
    pub top_k: i32,
    pub min_p: f32,
    /// RNG seed; 0 selects the fixed state 0x9e3779b97f4a7c15 (the server picks a time-based
    /// seed when the client gives none).
    pub seed: u64,
}

impl Default for SamplerParams {
    fn default() -> SamplerParams {
        SamplerParams {
            temperature: DEFAULT_TEMPERATURE,
            top_p: DEFAULT_TOP_P,
            top_k: DEFAULT_TOP_K,
            min_p: DEFAULT_MIN_P,
            seed: 0,
        }
    }
}

impl SamplerParams {
    /// The settings actually used: in thinking mode ds4's server ignores the client's sampling
    /// fields and uses its defaults (T 1, top_p 1, top_k off, min_p 0.05), keeping the seed.
    pub fn effective(self, thinking: bool) -> SamplerParams {
        if thinking {
            SamplerParams {
                seed: self.seed,
                ..SamplerParams::default()
            }
        } else {
            self
        }
    }
}

/// ds4's xorshift64* generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    const ZERO_STATE: u64 = 0x9e37_79b9_7f4a_7c15;
    const MULTIPLIER: u64 = 0x2545_f491_4f6c_dd1d;

    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = if self.state == 0 {
            Rng::ZERO_STATE
        } else {
            self.state
        };
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(Rng::MULTIPLIER)
    }

    /// Uniform in [0, 1) with 24 bits: bits 40..64 of the output.
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) & 0xff_ffff) as f32 / 16_777_216.0
    }
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
    weight: f32,
}

/// A sampler: settings, RNG state and scratch space.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplerParams,
    rng: Rng,
    candidates: Vec<Candidate>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Sampler {
        Sampler {
            params,
            rng: Rng::new(params.seed),
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplerParams {
        &self.params
    }

    /// Draws a token id from `logits` with the sampler's settings.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_with_temperature(logits, self.params.temperature)
    }

    /// Draws with a temperature override (0 for the greedy steps DSML forcing asks for).
    pub fn sample_with_temperature(&mut self, logits: &[f32], temperature: f32) -> u32 {
        if temperature <= 0.0 {
            return argmax(logits);
        }
        let top_p = if self.params.top_p <= 0.0 || self.params.top_p > 1.0 {
            1.0
        } else {
            self.params.top_p
        };
        let min_p = self.params.min_p.max(0.0);
        if self.params.top_k <= 0 {
            self.sample_full_vocab(logits, temperature, top_p, min_p)
        } else {
            let k = (self.params.top_k as usize)
                .min(MAX_TOP_K)
                .min(logits.len());
            self.sample_top_k(logits, temperature, k, top_p, min_p)
        }
    }

    fn sample_full_vocab(
        &mut self,
        logits: &[f32],
        temperature: f32,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        // The first maximum among finite logits.
        let mut best = 0u32;
        let mut max_logit = f32::NEG_INFINITY;
        let mut finite = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if v.is_finite() {
                finite += 1;
                if v > max_logit {
                    max_logit = v;
                    best = i as u32;
                }
            }
        }
        if finite == 0 {
            return argmax(logits);
        }
        let weight = |v: f32| ((v - max_logit) / temperature).exp();
        // A weight under min_p never counts (skipped, or cut from the sorted list), so its
        // exponential need not be taken: below this exponent (1 % under ln(min_p), far beyond
        // expf's rounding) the weight is surely under min_p. Most of a real vocabulary is, so
        // a decode step skips ~all of its 129 280 exponentials. None when min_p is 0; never
        // the maximum itself (exponent 0), which the sorted draw always keeps.
        let below_min_p = {
            let cut = (min_p.ln() - 0.01).min(-0.01);
            move |v: f32| (v - max_logit) / temperature < cut
        };

        if top_p >= 1.0 {
            // No sort: weights under min_p are skipped, the draw walks the vocabulary in order.
            let mut sum = 0.0f32;
            for &v in logits.iter().filter(|v| v.is_finite()) {
                if below_min_p(v) {
                    continue;
                }
                let p = weight(v);
                if p >= min_p {
                    sum += p;
                }
            }
            if sum <= 0.0 || !sum.is_finite() {
                return best;
            }
            let mut r = self.rng.next_f32() * sum;
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_finite() || below_min_p(v) {
                    continue;
                }
                let p = weight(v);
                if p < min_p {
                    continue;
                }
                r -= p;
                if r <= 0.0 {
                    return i as u32;
                }
            }
            return best;
        }

        // Every weight is in the sum; only those that draw_sorted could keep are sorted (it
        // stops at the first one under min_p after the top one, whose weight is 1).
        self.candidates.clear();
        let mut sum = 0.0f32;
        for (i, &v) in logits.iter().enumerate() {
            if v.is_finite() {
                let p = weight(v);
                if !below_min_p(v) {
                    self.candidates.push(Candidate {
                        id: i as u32,
                        logit: v,
                        weight: p,
                    });
                }
                sum += p;
            }
        }
        if sum <= 0.0 || !sum.is_finite() {
            return best;
        }
        // Stable: equal logits stay in vocab order.
        self.candidates.sort_by(|a, b| b.logit.total_cmp(&a.logit));
        self.draw_sorted(sum, top_p, min_p).unwrap_or(best)
    }

    fn sample_top_k(
        &mut self,
        logits: &[f32],
        temperature: f32,
        k: usize,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| Candidate {
                    id: i as u32,
                    logit: v,
                    weight: 0.0,
                }),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        // The k largest, ties broken by lower id (a stable sort of the finite logits).
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, |a, b| {
                b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
            });
            self.candidates.truncate(k);
        }
        self.candidates
            .sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
        let max_logit = self.candidates[0].logit;
        let mut sum = 0.0f32;
        for c in &mut self.candidates {
            c.weight = ((c.logit - max_logit) / temperature).exp();
            sum += c.weight;
        }
        if sum <= 0.0 || !sum.is_finite() {
            return self.candidates[0].id;
        }
        let top = self.candidates[0].id;
        self.draw_sorted(sum, top_p, min_p).unwrap_or(top)
    }

    /// Keeps the sorted candidates that pass min_p (relative to the top one) until top_p is
    /// reached, and draws one in sorted order.
    fn draw_sorted(&mut self, sum: f32, top_p: f32, min_p: f32) -> Option<u32> {
        let min_share = (self.candidates[0].weight / sum) * min_p;
        let mut kept_sum = 0.0f32;
        let mut kept = 0usize;
        for (i, c) in self.candidates.iter().enumerate() {
            if i > 0 && c.weight / sum < min_share {
                break;
            }
            kept_sum += c.weight;
            kept += 1;
            if kept_sum / sum >= top_p {
                break;
            }
        }
        if kept == 0 {
            return None;
        }
        let mut r = self.rng.next_f32() * kept_sum;
        for c in &self.candidates[..kept] {
            r -= c.weight;
            if r <= 0.0 {
                return Some(c.id);
            }
        }
        Some(self.candidates[kept - 1].id)
    }
}

/// One entry of a top-logprobs list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logit: f32,
    /// log-softmax over all finite logits (temperature 1), computed in f64.
    pub logprob: f32,
}

/// The `k` largest finite logits (ties: lower id first) with their log-probabilities. Empty when
/// no logit is finite.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<TokenLogprob> {
    let Some(logsum) = log_sum_exp(logits) else {
        return Vec::new();
    };
    let mut finite: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(finite.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < finite.len() {
        finite.select_nth_unstable_by(k - 1, order);
        finite.truncate(k);
    }
    finite.sort_by(order);
    finite
        .into_iter()
        .map(|(id, logit)| TokenLogprob {
            id,
            logit,
            logprob: (f64::from(logit) - logsum) as f32,
        })
        .collect()
}

/// The log-probability of one token (None: id out of range or no finite logit).
pub fn token_logprob(logits: &[f32], id: u32) -> Option<TokenLogprob> {
    let logit = *logits.get(id as usize)?;
    let logsum = log_sum_exp(logits)?;
    let logprob = if logit.is_finite() {
        (f64::from(logit) - logsum) as f32
    } else {
        f32::NEG_INFINITY
    };
    Some(TokenLogprob { id, logit, logprob })
}

fn log_sum_exp(logits: &[f32]) -> Option<f64> {
    let max = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let max = f64::from(max);
    let sum: f64 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| (f64::from(v) - max).exp())
        .sum();
    Some(max + sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full-vocabulary draw without the min_p shortcut (every exponential taken, every
    /// finite logit sorted): the oracle of `sample_full_vocab`.
    fn reference_full_vocab(rng: &mut Rng, logits: &[f32], t: f32, top_p: f32, min_p: f32) -> u32 {
        let finite: Vec<(u32, f32)> = (0..logits.len() as u32)
            .map(|i| (i, logits[i as usize]))
            .filter(|(_, v)| v.is_finite())
            .collect();
        let Some(&(best, max)) = finite
            .iter()
            .fold(None, |b: Option<&(u32, f32)>, c| match b {
                Some(b) if b.1 >= c.1 => Some(b),
                _ => Some(c),
            })
        else {
            return argmax(logits);
        };
        let w: Vec<f32> = finite.iter().map(|&(_, v)| ((v - max) / t).exp()).collect();
        if top_p >= 1.0 {
            let sum: f32 = w.iter().filter(|&&p| p >= min_p).sum();
            if sum <= 0.0 || !sum.is_finite() {
                return best;
            }
            let mut r = rng.next_f32() * sum;
            for (&(i, _), &p) in finite.iter().zip(&w) {
                if p >= min_p {
                    r -= p;
                    if r <= 0.0 {
                        return i;
                    }
                }
            }
            return best;
        }
        let sum: f32 = w.iter().sum();
        if sum <= 0.0 || !sum.is_finite() {
            return best;
        }
        let mut c: Vec<(u32, f32, f32)> = finite
            .iter()
            .zip(&w)
            .map(|(&(i, v), &p)| (i, v, p))
            .collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1));
        let min_share = (c[0].2 / sum) * min_p;
        let (mut kept_sum, mut kept) = (0.0f32, 0usize);
        for (k, x) in c.iter().enumerate() {
            if k > 0 && x.2 / sum < min_share {
                break;
            }
            kept_sum += x.2;
            kept += 1;
            if kept_sum / sum >= top_p {
                break;
            }
        }
        let mut r = rng.next_f32() * kept_sum;
        for x in &c[..kept] {
            r -= x.2;
            if r <= 0.0 {
                return x.0;
            }
        }
        c[kept - 1].0
    }

    #[test]
    fn full_vocab_draws_equal_the_reference_with_every_exponential() {
        // Logits spread like a model's (a few near the top, most far below), ties, -inf and
        // NaN; min_p 0 (no shortcut), the default 0.05, and above 1; top_p 1 and below.
        let mut gen = Rng::new(7);
        for case in 0..60 {
            let n = 300 + case * 37;
            let mut logits: Vec<f32> = (0..n)
                .map(|_| (gen.next_f32() - 0.9) * 40.0 * (1.0 + (case % 3) as f32))
                .collect();
            logits[case % n] = f32::NEG_INFINITY;
            logits[(case * 7) % n] = f32::NAN;
            logits[(case * 11) % n] = logits[(case * 13 + 1) % n];
            for &(t, top_p, min_p) in &[
                (1.0f32, 1.0f32, 0.05f32),
                (0.7, 1.0, 0.0),
                (1.3, 0.9, 0.05),
                (0.5, 0.95, 0.0),
                (1.0, 1.0, 1.5),
                (2.0, 0.5, 0.2),
            ] {
                let params = SamplerParams {
                    temperature: t,
                    top_p,
                    top_k: 0,
                    min_p,
                    seed: 1000 + case as u64,
                };
                let mut sampler = Sampler::new(params);
                let mut rng = Rng::new(params.seed);
                for draw in 0..20 {
                    let want = reference_full_vocab(&mut rng, &logits, t, top_p, min_p);
                    let got = sampler.sample(&logits);
                    assert_eq!(
                        got, want,
                        "case {case} T {t} top_p {top_p} min_p {min_p} draw {draw}"
                    );
                }
            }
        }
    }

    #[test]
    fn argmax_over_a_vocabulary_finds_the_first_maximum_across_blocks() {
        // The first index of the largest non-NaN value, the plain way.
        fn naive(v: &[f32]) -> u32 {
            let mut best: Option<(usize, f32)> = None;
            for (i, &x) in v.iter().enumerate() {
                if x.is_nan() {
                    continue;
                }
                if best.is_none_or(|(_, b)| x > b) {
                    best = Some((i, x));
                }
            }
            best.map_or(0, |(i, _)| i as u32)
        }
        let mut rng = crate::sampler::Rng::new(11);
        let vocab = 129_280;
        for case in 0..40 {
            let mut v: Vec<f32> = (0..vocab).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
            // Ties in two blocks, in one block, at block edges, and NaN / -inf sprinkled in.
            let peak = 11.0 + case as f32;
            let spots: &[usize] = match case % 5 {
                0 => &[129_279],
                1 => &[4095, 4096],
                2 => &[8192, 70_000, 129_000],
                3 => &[5, 4100, 4101],
                _ => &[65_535, 65_536, 12],
            };
            for &i in spots {
                v[i] = peak;
            }
            for i in (case..vocab).step_by(997) {
                v[i] = if i % 2 == 0 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
            }
            assert_eq!(argmax(&v), naive(&v), "case {case}");
        }
    }

    #[test]
    fn thinking_mode_uses_the_defaults_but_keeps_the_seed() {
        let client = SamplerParams {
            temperature: 0.2,
            top_p: 0.5,
            top_k: 7,
            min_p: 0.3,
            seed: 9,
        };
        assert_eq!(client.effective(false), client);
        let used = client.effective(true);
        assert_eq!(
            (
                used.temperature,
                used.top_p,
                used.top_k,
                used.min_p,
                used.seed
            ),
            (1.0, 1.0, 0, 0.05, 9)
        );
    }

    #[test]
    fn rng_matches_hand_computed_xorshift64_star() {
        // Seed 0 uses the fixed state; one step of x ^= x>>12; x ^= x<<25; x ^= x>>27.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), x.wrapping_mul(0x2545_f491_4f6c_dd1d));
        assert_eq!(rng.state, x);
        // A nonzero seed is used as the state directly.
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
