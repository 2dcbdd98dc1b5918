//! Mixture-of-experts routing and the clamped SwiGLU (dsv4-arch.md §3.10).
//!
//! Scores are sqrt(softplus(router logits)). Top-k layers select by score + bias, hash layers
//! take the token's fixed experts from `tid2eid`; either way the weights are the *unbiased*
//! scores of the selected experts, normalized and scaled by the routed scale.

use super::vecops::{silu, softplus, top_k_lowest_index};
use crate::numerics::Numerics;

/// ds4 floors the sum of selected scores at 2^-14 (C1); transformers adds 1e-20.
const DS4_WEIGHT_SUM_FLOOR: f32 = 6.1035e-5;
const REFERENCE_WEIGHT_SUM_EPS: f32 = 1e-20;

/// One token's routed experts and their weights, in selection order.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// How a layer picks experts for one token.
pub enum Selection<'a> {
    /// Top-k of score + bias (bias optional).
    TopK { bias: Option<&'a [f32]> },
    /// The token's row of `tid2eid`.
    Hash { experts: &'a [i32] },
}

/// Routes one token. Errors name the problem when a hash row points outside the experts.
pub fn route(
    logits: &[f32],
    selection: Selection<'_>,
    k: usize,
    routed_scale: f32,
    numerics: Numerics,
) -> Result<Route, String> {
    let scores: Vec<f32> = logits.iter().map(|&l| softplus(l).sqrt()).collect();
    let experts = match selection {
        Selection::TopK { bias: None } => top_k_lowest_index(&scores, k),
        Selection::TopK { bias: Some(b) } => {
            let biased: Vec<f32> = scores.iter().zip(b).map(|(s, b)| s + b).collect();
            top_k_lowest_index(&biased, k)
        }
        Selection::Hash { experts } => experts
            .iter()
            .map(|&e| {
                usize::try_from(e)
                    .ok()
                    .filter(|&e| e < scores.len())
                    .ok_or_else(|| {
                        format!(
                            "tid2eid names expert {e}, but the layer has {} experts",
                            scores.len()
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let sum: f32 = experts.iter().map(|&e| scores[e]).sum();
    let denom = match numerics {
        Numerics::Reference => sum + REFERENCE_WEIGHT_SUM_EPS,
        Numerics::Ds4 => sum.max(DS4_WEIGHT_SUM_FLOOR),
    };
    let weights = experts
        .iter()
        .map(|&e| scores[e] / denom * routed_scale)
        .collect();
    Ok(Route { experts, weights })
}

/// h = silu(min(gate, L)) · clamp(up, −L, L), in place into `gate`.
pub fn swiglu_clamped(gate: &mut [f32], up: &[f32], limit: f32) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(g.min(limit)) * u.clamp(-limit, limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_selects_but_does_not_weigh() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let s: Vec<f32> = logits.iter().map(|&l| softplus(l).sqrt()).collect();
        // Without bias experts 2 and 1 win; a big bias on expert 3 pulls it in.
        let r = route(
            &logits,
            Selection::TopK { bias: None },
            2,
            1.5,
            Numerics::Reference,
        )
        .unwrap();
        assert_eq!(r.experts, vec![2, 1]);
        let r = route(
            &logits,
            Selection::TopK {
                bias: Some(&[0.0, 0.0, 0.0, 10.0]),
            },
            2,
            1.5,
            Numerics::Reference,
        )
        .unwrap();
        assert_eq!(r.experts, vec![3, 2]);
        let sum = s[3] + s[2];
        assert!((r.weights[0] - 1.5 * s[3] / sum).abs() < 1e-6);
        assert!((r.weights[1] - 1.5 * s[2] / sum).abs() < 1e-6);
    }

    #[test]
    fn hash_rows_route_and_are_checked() {
        let logits = [0.5f32, 0.1, 0.3];
        let r = route(
            &logits,
            Selection::Hash { experts: &[2, 0] },
            2,
            1.0,
            Numerics::Ds4,
        )
        .unwrap();
        assert_eq!(r.experts, vec![2, 0]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(route(
            &logits,
            Selection::Hash { experts: &[3, 0] },
            2,
            1.0,
            Numerics::Ds4
        )
        .is_err());
        assert!(route(
            &logits,
            Selection::Hash { experts: &[-1, 0] },
            2,
            1.0,
            Numerics::Ds4
        )
        .is_err());
    }

    #[test]
    fn swiglu_clamps_gate_above_and_up_both_ways() {
        let mut g = [20.0f32, -20.0, 1.0];
        swiglu_clamped(&mut g, &[-30.0, 5.0, 30.0], 10.0);
        assert!((g[0] - silu(10.0) * -10.0).abs() < 1e-5);
        assert!((g[1] - silu(-20.0) * 5.0).abs() < 1e-9);
        assert!((g[2] - silu(1.0) * 10.0).abs() < 1e-6);
    }
}
