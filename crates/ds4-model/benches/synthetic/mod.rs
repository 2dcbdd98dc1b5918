//! Synthetic DeepSeek V4 models in ds4's layout, for benchmarks and for tests that need
//! shapes the tiny fixtures lack (rows of 256+ so the K-quant expert formats really apply).
//!
//! Every tensor of `layout::expected_tensors(cfg)` is stored in the type the weights mode
//! gives it, filled with seeded random values of sane scale: linear weights N(0, 1/fan_in),
//! norms U(0.8, 1.2), other vectors N(0, 0.1), embeddings N(0, 1), distinct hash experts.
//! Large tensors repeat a quantized tile of rows: the bytes read per token, and so the cost,
//! are those of a real model, while generation stays fast.

#![allow(dead_code)]

use std::path::Path;

use ds4_gguf::quant::quantize;
use ds4_gguf::writer::GgufWriter;
use ds4_gguf::GgmlType;
use ds4_model::config::ModelConfig;
use ds4_model::layout::{expected_tensors, storage_type, TensorRole, WeightsMode};

/// Rows quantized per tile; bigger tensors repeat the tile.
const TILE_ROWS: usize = 64;

struct Rng(u64);

impl Rng {
    fn new(seed: u64, name: &str) -> Rng {
        let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

/// Writes a synthetic model of description `cfg` to `path`.
pub fn write_model(cfg: &ModelConfig, mode: WeightsMode, path: &Path, seed: u64) {
    let mut w = GgufWriter::new();
    for spec in expected_tensors(cfg) {
        let row_len = spec.dims[0] as usize;
        let rows: usize = spec.dims[1..].iter().product::<u64>() as usize;
        let (ty, _) = storage_type(spec.role, mode, row_len as u64);
        let mut rng = Rng::new(seed, &spec.name);
        let data = if spec.role == TensorRole::HashTable {
            // Row t: k distinct experts.
            let (k, e) = (row_len, cfg.n_experts);
            (0..rows)
                .flat_map(|t| (0..k).map(move |j| ((t * 7 + j * (e / k).max(1)) % e) as i32))
                .flat_map(|v| v.to_le_bytes())
                .collect()
        } else {
            let value = |rng: &mut Rng| -> f32 {
                match spec.role {
                    TensorRole::Vector if spec.name.contains("norm") => 0.8 + 0.4 * rng.uniform(),
                    TensorRole::Vector if spec.name.contains("scale") => 0.5 + rng.uniform(),
                    TensorRole::Vector => 0.1 * rng.normal(),
                    TensorRole::Embedding => rng.normal(),
                    _ => rng.normal() / (row_len as f32).sqrt(),
                }
            };
            let tile_rows = rows.min(TILE_ROWS);
            let tile: Vec<f32> = (0..tile_rows * row_len).map(|_| value(&mut rng)).collect();
            let row_bytes = ty.row_bytes(row_len as u64).unwrap() as usize;
            let mut tile_bytes = vec![0u8; tile_rows * row_bytes];
            quantize(ty, &tile, &mut tile_bytes).unwrap();
            let mut data = Vec::with_capacity(rows * row_bytes);
            while data.len() < rows * row_bytes {
                let n = (rows * row_bytes - data.len()).min(tile_bytes.len());
                data.extend_from_slice(&tile_bytes[..n]);
            }
            data
        };
        let ty = if spec.role == TensorRole::HashTable {
            GgmlType::I32
        } else {
            ty
        };
        w.add_tensor(&spec.name, ty, &spec.dims, data).unwrap();
    }
    w.write_to_path(path).unwrap();
}

/// A small description whose rows are long enough for every K-quant (d = 256, I = 256,
/// indexer heads of 128 so ds4's Hadamard applies), with sliding, CSA and HCA layers, hash
/// and top-k MoE, and a window shorter than the test prompts.
pub fn small_config() -> ModelConfig {
    let mut cfg = ModelConfig::flash();
    cfg.vocab_size = 512;
    cfg.hidden = 256;
    cfg.n_layers = 3;
    cfg.n_heads = 4;
    cfg.head_dim = 128;
    cfg.rope_dim = 32;
    cfg.q_lora_rank = 64;
    cfg.o_groups = 2;
    cfg.o_lora_rank = 64;
    cfg.n_experts = 8;
    cfg.n_experts_used = 2;
    cfg.expert_ff = 256;
    cfg.swiglu_clamp = vec![10.0; 3];
    cfg.sliding_window = 16;
    cfg.compress_ratio = vec![0, 4, 16];
    cfg.attn_kind = vec![
        ds4_model::config::AttnKind::Sliding,
        ds4_model::config::AttnKind::Csa,
        ds4_model::config::AttnKind::Hca,
    ];
    cfg.moe_kind = vec![
        ds4_model::config::MoeKind::Hash,
        ds4_model::config::MoeKind::TopK,
        ds4_model::config::MoeKind::TopK,
    ];
    cfg.index_heads = 4;
    cfg.index_head_dim = 128;
    cfg.index_topk = 4;
    cfg
}

/// One full-size DeepSeek V4 Flash layer (a CSA layer with top-k MoE, the most expensive
/// kind) with a small vocabulary: the embedding and head are not what is measured.
pub fn flash_layer_config() -> ModelConfig {
    let mut cfg = ModelConfig::flash();
    cfg.vocab_size = 256;
    cfg.n_layers = 1;
    cfg.swiglu_clamp = vec![10.0];
    cfg.compress_ratio = vec![4];
    cfg.attn_kind = vec![ds4_model::config::AttnKind::Csa];
    cfg.moe_kind = vec![ds4_model::config::MoeKind::TopK];
    cfg
}
