//! When the server writes checkpoints (ds4-spec.md §3 "Save triggers"), as pure functions of
//! the `--kv-cache-*` knobs so the server only has to call them at the right moments.

/// The `--kv-cache-*` knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavePolicy {
    /// `--kv-cache-min-tokens`: no checkpoint (and no disk hit) shorter than this.
    pub min_tokens: u32,
    /// `--kv-cache-cold-max-tokens`: cold saves only for prompts up to this length (0: never).
    pub cold_max_tokens: u32,
    /// `--kv-cache-continued-interval-tokens` (0: no continued saves).
    pub continued_interval_tokens: u32,
    /// `--kv-cache-boundary-trim-tokens`: tokens dropped from a prompt's tail before saving
    /// (the tokenizer may merge across the end of a prompt).
    pub boundary_trim_tokens: u32,
    /// `--kv-cache-boundary-align-tokens`: saved lengths are rounded down to a multiple of
    /// this (the prefill chunk, so compressor rows finalize as in a cold prefill).
    pub boundary_align_tokens: u32,
}

impl Default for SavePolicy {
    fn default() -> SavePolicy {
        SavePolicy {
            min_tokens: 512,
            cold_max_tokens: 30000,
            continued_interval_tokens: 10000,
            boundary_trim_tokens: 32,
            boundary_align_tokens: 2048,
        }
    }
}

impl SavePolicy {
    /// The stable length of a prompt of `tokens` tokens: trimmed by `boundary_trim_tokens`
    /// and aligned down, if that still leaves at least `min_tokens`; else the whole prompt.
    pub fn store_len(&self, tokens: u32) -> u32 {
        let (min, trim, align) = (
            self.min_tokens,
            self.boundary_trim_tokens,
            self.boundary_align_tokens,
        );
        if tokens as u64 > min as u64 + trim as u64 {
            let mut stable = tokens - trim;
            if align > 0 {
                stable -= stable % align;
            }
            if stable >= min {
                return stable;
            }
        }
        tokens
    }

    /// Position of the last `user` marker before the first `assistant` marker, if it is at
    /// least `min_tokens`: the stable chat prefix (system prompt and earlier turns) that
    /// independent requests are most likely to share.
    pub fn chat_anchor_pos(
        &self,
        prompt: &[u32],
        user_token: u32,
        assistant_token: u32,
    ) -> Option<u32> {
        let mut last_user = None;
        for (i, &t) in prompt.iter().enumerate() {
            if t == assistant_token {
                break;
            }
            if t == user_token {
                last_user = Some(i as u32);
            }
        }
        last_user.filter(|&p| p >= self.min_tokens)
    }

    /// The cold checkpoint for a prompt that missed every cache (memory and disk): `None` when
    /// the prompt is outside [`min_tokens`, `cold_max_tokens`], else the length to save — the
    /// chat anchor, or [`SavePolicy::store_len`]. When the length is below the prompt's, the
    /// server prefills that prefix, saves it, then prefills the rest; when equal, it saves
    /// after the whole prompt.
    pub fn cold_save_len(
        &self,
        prompt: &[u32],
        user_token: u32,
        assistant_token: u32,
    ) -> Option<u32> {
        let n = u32::try_from(prompt.len()).ok()?;
        if self.cold_max_tokens == 0 || n < self.min_tokens || n > self.cold_max_tokens {
            return None;
        }
        let len = self
            .chat_anchor_pos(prompt, user_token, assistant_token)
            .unwrap_or_else(|| self.store_len(n));
        (len >= self.min_tokens).then_some(len)
    }

    /// The continued-save step: the interval rounded up to the alignment (10000 → 10240).
    pub fn continued_step(&self) -> u32 {
        let (step, align) = (self.continued_interval_tokens, self.boundary_align_tokens);
        if step == 0 || align == 0 {
            return step;
        }
        step.div_ceil(align).saturating_mul(align)
    }

    /// Whether a live session that just reached `live_tokens` (during prefill or after a decode
    /// step, never inside a tool call) must be saved as *continued*: a multiple of the step,
    /// at least `min_tokens`, and beyond the last saved length.
    pub fn continued_due(&self, live_tokens: u32, last_saved_tokens: u32) -> bool {
        let step = self.continued_step();
        step > 0
            && live_tokens >= self.min_tokens
            && live_tokens.is_multiple_of(step)
            && live_tokens > last_saved_tokens
    }

    /// The positions inside a prefill span (`from`, `to`] where a continued save falls, so the
    /// server can split the prefill there.
    pub fn continued_points(&self, from: u32, to: u32, last_saved_tokens: u32) -> Vec<u32> {
        let step = self.continued_step();
        if step == 0 {
            return Vec::new();
        }
        let first = (from / step + 1) as u64 * step as u64;
        (first..=to as u64)
            .step_by(step as usize)
            .map(|p| p as u32)
            .filter(|&p| self.continued_due(p, last_saved_tokens))
            .collect()
    }

    /// Whether a live session of `live_tokens` is worth saving as *evict* before a disk load
    /// replaces it (or as *shutdown* at a clean exit).
    pub fn live_worth_saving(&self, live_tokens: u32) -> bool {
        live_tokens >= self.min_tokens && live_tokens > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: u32 = 128803;
    const ASSISTANT: u32 = 128804;

    #[test]
    fn defaults_are_ds4s() {
        let p = SavePolicy::default();
        assert_eq!(
            (p.min_tokens, p.cold_max_tokens, p.continued_interval_tokens),
            (512, 30000, 10000)
        );
        assert_eq!(
            (p.boundary_trim_tokens, p.boundary_align_tokens),
            (32, 2048)
        );
        assert_eq!(p.continued_step(), 10240);
    }

    #[test]
    fn store_len_trims_and_aligns() {
        let p = SavePolicy::default();
        // 5000 − 32 = 4968 → 4096.
        assert_eq!(p.store_len(5000), 4096);
        // 2080 − 32 = 2048 exactly.
        assert_eq!(p.store_len(2080), 2048);
        // 2079 − 32 = 2047 → 0 < 512: the whole prompt.
        assert_eq!(p.store_len(2079), 2079);
        // Not more than min + trim: the whole prompt.
        assert_eq!(p.store_len(544), 544);
        let unaligned = SavePolicy {
            boundary_align_tokens: 0,
            ..p
        };
        assert_eq!(unaligned.store_len(1000), 968);
        assert_eq!(unaligned.store_len(545), 513);
    }

    fn prompt(len: usize, user_at: &[usize], assistant_at: &[usize]) -> Vec<u32> {
        let mut v = vec![7u32; len];
        for &i in user_at {
            v[i] = USER;
        }
        for &i in assistant_at {
            v[i] = ASSISTANT;
        }
        v
    }

    #[test]
    fn chat_anchor_is_last_user_before_first_assistant() {
        let p = SavePolicy::default();
        let v = prompt(3000, &[10, 900, 1500, 2500], &[2000, 2800]);
        assert_eq!(p.chat_anchor_pos(&v, USER, ASSISTANT), Some(1500));
        // A user marker before min_tokens is no anchor.
        let v = prompt(3000, &[100], &[2000]);
        assert_eq!(p.chat_anchor_pos(&v, USER, ASSISTANT), None);
        // No assistant marker: the last user marker anywhere.
        let v = prompt(3000, &[600, 2999], &[]);
        assert_eq!(p.chat_anchor_pos(&v, USER, ASSISTANT), Some(2999));
    }

    #[test]
    fn cold_save_only_inside_the_window() {
        let p = SavePolicy::default();
        assert_eq!(
            p.cold_save_len(&prompt(511, &[], &[]), USER, ASSISTANT),
            None
        );
        assert_eq!(
            p.cold_save_len(&prompt(30001, &[], &[]), USER, ASSISTANT),
            None
        );
        assert_eq!(
            p.cold_save_len(&prompt(30000, &[], &[]), USER, ASSISTANT),
            Some(28672)
        );
        assert_eq!(
            p.cold_save_len(&prompt(512, &[], &[]), USER, ASSISTANT),
            Some(512)
        );
        // The anchor wins when it is long enough.
        let v = prompt(5000, &[3, 700], &[4000]);
        assert_eq!(p.cold_save_len(&v, USER, ASSISTANT), Some(700));
        // Anchor too short: fall back to the trimmed, aligned length.
        let v = prompt(5000, &[3], &[4000]);
        assert_eq!(p.cold_save_len(&v, USER, ASSISTANT), Some(4096));
        let off = SavePolicy {
            cold_max_tokens: 0,
            ..p
        };
        assert_eq!(
            off.cold_save_len(&prompt(5000, &[], &[]), USER, ASSISTANT),
            None
        );
    }

    #[test]
    fn continued_saves_every_step_beyond_the_last() {
        let p = SavePolicy::default();
        assert!(p.continued_due(10240, 0));
        assert!(!p.continued_due(10000, 0));
        assert!(!p.continued_due(10240, 10240));
        assert!(p.continued_due(20480, 10240));
        assert!(!p.continued_due(10241, 0));
        assert_eq!(p.continued_points(0, 30000, 0), vec![10240, 20480]);
        assert_eq!(p.continued_points(10240, 30720, 10240), vec![20480, 30720]);
        assert_eq!(p.continued_points(0, 30000, 20480), Vec::<u32>::new());
        let small = SavePolicy {
            min_tokens: 16,
            continued_interval_tokens: 10,
            boundary_align_tokens: 8,
            ..p
        };
        assert_eq!(small.continued_step(), 16);
        assert_eq!(small.continued_points(0, 50, 0), vec![16, 32, 48]);
        let off = SavePolicy {
            continued_interval_tokens: 0,
            ..p
        };
        assert!(!off.continued_due(10240, 0));
        assert!(off.continued_points(0, 100000, 0).is_empty());
    }

    #[test]
    fn live_sessions_below_min_are_not_saved() {
        let p = SavePolicy::default();
        assert!(!p.live_worth_saving(511));
        assert!(p.live_worth_saving(512));
    }
}
