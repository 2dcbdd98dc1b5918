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
use ds4_model::greedy::non_nan_max;
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
    /// Each block's largest finite logit (see [`BLOCK`]).
    block_max: Vec<f32>,
    /// The finite ones of `block_max`, partly ordered (top-k).
    ranked_block_max: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Sampler {
        Sampler {
            params,
            rng: Rng::new(params.seed),
            candidates: Vec::new(),
            block_max: Vec::new(),
            ranked_block_max: Vec::new(),
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
        finite_block_maxima(&mut self.block_max, logits);
        let block_max = &self.block_max;
        let max_logit = block_max.iter().copied().fold(f32::NEG_INFINITY, larger);
        if max_logit == f32::NEG_INFINITY {
            return argmax(logits);
        }
        // What a draw falls back on: the first maximum among finite logits (-0.0 == +0.0, as
        // for `>`). Rarely needed, so only searched for then.
        let first_max = || {
            let first = logits.iter().position(|&v| v == max_logit);
            first.map_or(0, |i| i as u32)
        };
        let weight = |v: f32| ((v - max_logit) / temperature).exp();
        // A weight under min_p never counts (skipped, or cut from the sorted list), so its
        // exponential need not be taken: when the exponent, (v - max_logit) / temperature in
        // f32 as `weight` has it, is under `cut` (1 % under ln(min_p)), the weight, expf of that
        // very exponent, is at most about 0.99 min_p: lnf's and expf's rounding (an ulp or so)
        // is far inside the margin (for min_p not subnormal). Nothing is skipped when min_p is
        // 0; never the maximum itself (exponent 0), which the sorted draw always keeps.
        let cut = (min_p.ln() - 0.01).min(-0.01);
        // The finite logits with an exponent under `cut` are exactly those under `threshold`
        // (see lowest_logit_not_below): nearly all of a model's 129 280, so that a draw looks
        // into a few blocks (those whose maximum reaches it) and takes a handful of exponentials.
        let threshold = lowest_logit_not_below(max_logit, temperature, cut);
        let unskipped = || finite_at_or_above(logits, block_max, threshold);

        if top_p >= 1.0 {
            // No sort: weights under min_p are skipped, the draw walks the vocabulary in order.
            let mut sum = 0.0f32;
            for (_, v) in unskipped() {
                let p = weight(v);
                if p >= min_p {
                    sum += p;
                }
            }
            if sum <= 0.0 || !sum.is_finite() {
                return first_max();
            }
            let mut r = self.rng.next_f32() * sum;
            for (id, v) in unskipped() {
                let p = weight(v);
                if p < min_p {
                    continue;
                }
                r -= p;
                if r <= 0.0 {
                    return id;
                }
            }
            return first_max();
        }

        // Every weight is in the sum; only those that draw_sorted could keep are sorted (it
        // stops at the first one under min_p after the top one, whose weight is 1).
        let mut sum = 0.0f32;
        for &v in logits {
            if v.is_finite() {
                sum += weight(v);
            }
        }
        if sum <= 0.0 || !sum.is_finite() {
            return first_max();
        }
        self.candidates.clear();
        self.candidates
            .extend(unskipped().map(|(id, logit)| Candidate {
                id,
                logit,
                weight: weight(logit),
            }));
        // Stable: equal logits stay in vocab order.
        self.candidates.sort_by(|a, b| b.logit.total_cmp(&a.logit));
        self.draw_sorted(sum, top_p, min_p)
            .unwrap_or_else(first_max)
    }

    fn sample_top_k(
        &mut self,
        logits: &[f32],
        temperature: f32,
        k: usize,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        // The k best finite logits (in `by_rank` order) in one pass over the vocabulary: a
        // logit is admitted only when its `total_order_key` is above `floor`, and no logit
        // among the k best is at or under it.
        finite_block_maxima(&mut self.block_max, logits);
        // k blocks hold a logit at or above the k-th largest block maximum, so none below it
        // is among the k best: `floor` starts just under it (with fewer finite block maxima
        // than k, at -inf, which every finite logit is above). k is 0 only with no logits.
        self.ranked_block_max.clear();
        let finite_maxima = self.block_max.iter().filter(|m| m.is_finite());
        self.ranked_block_max.extend(finite_maxima);
        let mut floor = total_order_key(f32::NEG_INFINITY);
        if k > 0 && k <= self.ranked_block_max.len() {
            let (_, &mut kth, _) = self
                .ranked_block_max
                .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            floor = total_order_key(kth) - 1;
        }
        // Up to 2k are held; then the k best are kept, and the key of the worst of them is the
        // new `floor` (a later logit equal to it has a higher id, so ranks below it).
        self.candidates.clear();
        for (start, block, block_max) in blocks(logits, &self.block_max) {
            // None of the block is above `floor`. (A block whose maximum is -0.0 can hold
            // +0.0, one key above it.)
            if total_order_key(block_max) < floor {
                continue;
            }
            for (start, chunk) in (start..).step_by(CHUNK).zip(block.chunks(CHUNK)) {
                if !any_in_chunk(chunk, |v| total_order_key(v) > floor) {
                    continue;
                }
                for (id, &v) in (start..).zip(chunk) {
                    if total_order_key(v) <= floor || !v.is_finite() {
                        continue;
                    }
                    self.candidates.push(Candidate {
                        id,
                        logit: v,
                        weight: 0.0,
                    });
                    if self.candidates.len() == 2 * k {
                        self.candidates.select_nth_unstable_by(k - 1, by_rank);
                        self.candidates.truncate(k);
                        floor = total_order_key(self.candidates[k - 1].logit);
                    }
                }
            }
        }
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_rank);
            self.candidates.truncate(k);
        }
        // The ids make `by_rank` a strict order: any sort gives the one sorted list.
        self.candidates.sort_unstable_by(by_rank);
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

/// The top-k order: larger logit first (`total_cmp`: +0.0 before -0.0), then lower id.
fn by_rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// An integer that orders like [`f32::total_cmp`]: the bits, with the magnitude bits of a
/// negative value flipped (so -0.0 is just below +0.0). Its own inverse.
fn total_order_key(v: f32) -> i32 {
    let bits = v.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The f32 whose [`total_order_key`] is `key`.
fn from_total_order_key(key: i32) -> f32 {
    f32::from_bits(total_order_key(f32::from_bits(key as u32)) as u32)
}

/// The larger of two, NaN never winning (`v > max` is false for it).
fn larger(max: f32, v: f32) -> f32 {
    if v > max {
        v
    } else {
        max
    }
}

/// The sampler scans logits in blocks of this many, skipping the blocks whose finite maximum
/// tells that none of theirs is wanted: in a model's logits, nearly all of them.
const BLOCK: usize = 256;

/// Within a block, the top-k scan tests this many logits at once (vectorized), and looks at
/// them one by one only when one may be admitted.
const CHUNK: usize = 16;

/// Whether `test` holds for a value of `chunk`, testing all of a full chunk without branches
/// (so that it vectorizes).
fn any_in_chunk(chunk: &[f32], test: impl Fn(f32) -> bool) -> bool {
    match <&[f32; CHUNK]>::try_from(chunk) {
        Ok(full) => full.iter().fold(false, |any, &v| any | test(v)),
        Err(_) => chunk.iter().any(|&v| test(v)),
    }
}

/// Each block's largest finite logit (-inf when none), into `maxima`.
fn finite_block_maxima(maxima: &mut Vec<f32>, logits: &[f32]) {
    maxima.clear();
    maxima.extend(logits.chunks(BLOCK).map(|block| {
        let max = non_nan_max(block);
        if max == f32::INFINITY {
            // It hides the block's finite maximum (never so in a model's logits).
            let finite = block.iter().copied().filter(|v| v.is_finite());
            finite.fold(f32::NEG_INFINITY, larger)
        } else {
            max
        }
    }));
}

/// The blocks of `logits`, each with the id of its first logit and its finite maximum.
fn blocks<'a>(
    logits: &'a [f32],
    block_max: &'a [f32],
) -> impl Iterator<Item = (u32, &'a [f32], f32)> + 'a {
    let starts = (0..).step_by(BLOCK);
    starts
        .zip(logits.chunks(BLOCK))
        .zip(block_max.iter().copied())
        .map(|((start, block), max)| (start, block, max))
}

/// The finite logits at or above `threshold` (finite) with their ids, in vocabulary order,
/// looking only into the blocks whose maximum reaches it.
fn finite_at_or_above<'a>(
    logits: &'a [f32],
    block_max: &'a [f32],
    threshold: f32,
) -> impl Iterator<Item = (u32, f32)> + 'a {
    blocks(logits, block_max)
        .filter(move |&(_, _, max)| max >= threshold)
        .flat_map(move |(start, block, _)| {
            // NaN and -inf fail `>=`, +inf fails `<=`.
            let at_or_above = move |&(_, v): &(u32, f32)| v >= threshold && v <= f32::MAX;
            (start..).zip(block.iter().copied()).filter(at_or_above)
        })
}

/// The lowest finite logit v whose exponent `(v - max_logit) / temperature`, in f32 as the
/// weights take it, is not below `cut` (≤ -0.01): the finite logits under it are exactly those
/// whose exponent is. The rounded subtraction and division are monotonic (temperature > 0),
/// so the exponent never decreases as v grows, and the step from below `cut` to not is found
/// by bisecting the f32 values (in `total_cmp` order) up to `max_logit` (exponent 0).
/// -f32::MAX (nothing finite is under it) when no exponent is below `cut`: min_p 0 (cut
/// -inf), temperature inf or NaN.
fn lowest_logit_not_below(max_logit: f32, temperature: f32, cut: f32) -> f32 {
    let below = |v: f32| (v - max_logit) / temperature < cut;
    if !below(-f32::MAX) {
        return -f32::MAX;
    }
    // `below` holds at `low` and not at `high`. (-0.0 and +0.0 have the same exponent.)
    let mut low = i64::from(total_order_key(-f32::MAX));
    let mut high = i64::from(total_order_key(max_logit));
    while high - low > 1 {
        let mid = (low + high) / 2;
        if below(from_total_order_key(mid as i32)) {
            low = mid;
        } else {
            high = mid;
        }
    }
    from_total_order_key(high as i32)
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
        reference_draw_sorted(rng, &c, sum, top_p, min_p)
    }

    /// The top-k draw from every finite logit in `by_rank` order (`ranked`, from a full
    /// stable sort): the oracle of `sample_top_k`.
    fn reference_top_k(
        rng: &mut Rng,
        logits: &[f32],
        ranked: &[(u32, f32)],
        t: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        let Some(&(top, max)) = ranked.first() else {
            return argmax(logits);
        };
        let best = &ranked[..top_k.min(MAX_TOP_K).min(ranked.len())];
        let c: Vec<(u32, f32, f32)> = best
            .iter()
            .map(|&(i, v)| (i, v, ((v - max) / t).exp()))
            .collect();
        let sum = c.iter().fold(0.0f32, |s, x| s + x.2);
        if sum <= 0.0 || !sum.is_finite() {
            return top;
        }
        reference_draw_sorted(rng, &c, sum, top_p, min_p)
    }

    /// The finite logits sorted by logit (descending, `total_cmp`), then id: a plain stable
    /// sort of all of them.
    fn ranked_finite(logits: &[f32]) -> Vec<(u32, f32)> {
        let mut ranked: Vec<(u32, f32)> = (0..logits.len() as u32)
            .map(|i| (i, logits[i as usize]))
            .filter(|(_, v)| v.is_finite())
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked
    }

    /// draw_sorted over sorted (id, logit, weight): kept while the weight's share is at least
    /// min_p times the top one's and until the kept share reaches top_p; one draw in order.
    fn reference_draw_sorted(
        rng: &mut Rng,
        c: &[(u32, f32, f32)],
        sum: f32,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
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

    /// `v` moved `steps` f32 values down.
    fn ulps_below(v: f32, steps: u32) -> f32 {
        if v > 0.0 {
            f32::from_bits(v.to_bits() - steps)
        } else {
            // Away from zero; 0.0 as -0.0, so that it goes below.
            f32::from_bits((-v.abs()).to_bits() + steps)
        }
    }

    #[test]
    fn full_vocab_draws_equal_the_reference_with_every_exponential() {
        // Logits spread like a model's (a few near the top, most far below), ties, -inf, +inf
        // and NaN, copies of the maximum, and logits a few f32 steps under the maximum (at
        // T 1e-4 and 0.01 with logits in the hundreds, their weights straddle min_p). min_p 0
        // (no shortcut), tiny, the default 0.05, near 1 and above 1; top_p 1 and below.
        let mut gen = Rng::new(7);
        for case in 0..60 {
            let n = 300 + case * 37;
            let offset = if case % 2 == 1 { 300.0 } else { 0.0 };
            let mut logits: Vec<f32> = (0..n)
                .map(|_| offset + (gen.next_f32() - 0.9) * 40.0 * (1.0 + (case % 3) as f32))
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for q in 0..30 {
                let steps = (gen.next_u64() % (1 << (q % 13))) as u32;
                logits[gen.next_u64() as usize % n] = ulps_below(max, steps);
            }
            for _ in 0..case % 4 {
                logits[gen.next_u64() as usize % n] = max;
            }
            logits[case % n] = f32::NEG_INFINITY;
            logits[(case * 7) % n] = f32::NAN;
            logits[(case * 11) % n] = logits[(case * 13 + 1) % n];
            if case % 5 == 0 {
                logits[(case * 17) % n] = f32::INFINITY;
            }
            for &(t, top_p, min_p) in &[
                (1.0f32, 1.0f32, 0.05f32),
                (0.7, 1.0, 0.0),
                (1.3, 0.9, 0.05),
                (0.5, 0.95, 0.0),
                (1.0, 1.0, 1.5),
                (2.0, 0.5, 0.2),
                (1e-4, 1.0, 0.05),
                (1e-4, 0.9, 0.05),
                (0.01, 1.0, 0.05),
                (0.01, 0.95, 0.3),
                (1.0, 1.0, 0.999),
                (0.01, 0.9, 0.999),
                (1.0, 1.0, 1e-6),
                (0.3, 0.95, 1e-30),
                (100.0, 1.0, 0.99),
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
    fn top_k_draws_equal_the_reference_with_a_full_sort() {
        // Vocabularies of a few hundred to a few thousand logits (and a few larger ones, where
        // more blocks than k bound the scan), continuous or on a coarse grid (many ties), with
        // the k-th logit copied elsewhere (ties at the boundary), ±0.0 at the top, and -inf,
        // +inf and NaN sprinkled in.
        let mut gen = Rng::new(17);
        for case in 0..90u64 {
            let n = match case % 10 {
                0 => 20_000 + case as usize,
                _ => 200 + (gen.next_u64() % 3000) as usize,
            };
            let mut logits: Vec<f32> = (0..n)
                .map(|_| match case % 3 {
                    0 => (gen.next_f32() - 0.8) * 30.0,
                    1 => (gen.next_u64() % 12) as f32 * 0.5 - 5.0,
                    _ => -((gen.next_u64() % 6) as f32) * 0.25,
                })
                .collect();
            if case % 3 == 2 {
                // All ≤ 0: the best are ±0.0, +0.0 ranking first.
                for _ in 0..6 {
                    let i = gen.next_u64() as usize % n;
                    logits[i] = [0.0, -0.0][gen.next_u64() as usize % 2];
                }
            }
            for _ in 0..case % 7 {
                let i = gen.next_u64() as usize % n;
                logits[i] = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -f32::NAN]
                    [gen.next_u64() as usize % 4];
            }
            for k in [1usize, 2, 40, 1024, n + 7] {
                // Ties at the k-th logit, before and after it.
                let mut logits = logits.clone();
                let ranked = ranked_finite(&logits);
                if let Some(&(_, kth)) = ranked.get(k - 1) {
                    for _ in 0..3 {
                        logits[gen.next_u64() as usize % n] = kth;
                    }
                }
                let ranked = ranked_finite(&logits);
                for &(t, top_p, min_p) in &[
                    (1.0f32, 1.0f32, 0.0f32),
                    (1.0, 0.95, 0.05),
                    (0.3, 0.9, 0.0),
                    (2.5, 0.5, 0.2),
                    (0.01, 1.0, 0.05),
                ] {
                    let params = SamplerParams {
                        temperature: t,
                        top_p,
                        top_k: k as i32,
                        min_p,
                        seed: 2000 + case,
                    };
                    let mut sampler = Sampler::new(params);
                    let mut rng = Rng::new(params.seed);
                    for draw in 0..10 {
                        let want = reference_top_k(&mut rng, &logits, &ranked, t, k, top_p, min_p);
                        let got = sampler.sample(&logits);
                        assert_eq!(
                            got, want,
                            "case {case} n {n} k {k} T {t} top_p {top_p} min_p {min_p} draw {draw}"
                        );
                    }
                }
            }
        }
        // Nothing finite: argmax, as with the full vocabulary.
        let mut sampler = Sampler::new(SamplerParams {
            top_k: 40,
            ..SamplerParams::default()
        });
        let none = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, f32::NAN];
        assert_eq!(sampler.sample(&none), argmax(&none));
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
