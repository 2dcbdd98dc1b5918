//! Helpers shared by the integration tests: small model descriptions, structurally valid
//! payloads filled with pseudo-random state, and scratch directories.
#![allow(dead_code)]

use std::path::PathBuf;

use ds4_model::config::{AttnKind, ModelConfig};
use ds4_model::session::SessionState;

/// A deterministic xorshift generator (tests must not need extra crates).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// A miniature Flash-like description: sliding, sliding, CSA (4), HCA (16), vocab 300.
pub fn mini_config() -> ModelConfig {
    let mut c = ModelConfig::flash();
    c.vocab_size = 300;
    c.n_layers = 4;
    c.head_dim = 16;
    c.index_head_dim = 8;
    c.sliding_window = 6;
    c.compress_ratio = vec![0, 0, 4, 16];
    c.attn_kind = vec![
        AttnKind::Sliding,
        AttnKind::Sliding,
        AttnKind::Csa,
        AttnKind::Hca,
    ];
    c.moe_kind.truncate(4);
    c.swiglu_clamp.truncate(4);
    c
}

/// A payload of `tokens` in a session of context `ctx`, every float pseudo-random.
pub fn synthetic_payload(cfg: &ModelConfig, ctx: usize, tokens: &[u32], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut s = SessionState::new(cfg, ctx);
    s.tokens = tokens.to_vec();
    s.last_logits = (0..cfg.vocab_size).map(|_| rng.f32()).collect();
    let t = tokens.len();
    for (l, layer) in s.layers.iter_mut().enumerate() {
        let row: Vec<f32> = (0..cfg.head_dim).map(|_| rng.f32()).collect();
        for pos in t.saturating_sub(layer.raw.capacity())..t {
            layer.raw.put(pos, &row);
        }
        let ratio = cfg.compress_ratio[l] as usize;
        for c in [&mut layer.attn, &mut layer.index].into_iter().flatten() {
            let w = c.rows.width();
            for _ in 0..t / ratio {
                let row: Vec<f32> = (0..w).map(|_| rng.f32()).collect();
                assert!(c.rows.push(&row));
            }
            let n = c.frontier.state().0.len();
            let kv: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let sc: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            c.frontier.set_state(&kv, &sc);
        }
    }
    s.to_payload(cfg)
}

pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed | 1);
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// A fresh empty directory under the system temp dir, unique to this process and `name`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ds4-kvstore-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The rendered text the tests use as a key for a token sequence (the store only sees bytes).
pub fn render(tokens: &[u32]) -> String {
    tokens.iter().map(|t| format!("<t{t}>")).collect()
}
