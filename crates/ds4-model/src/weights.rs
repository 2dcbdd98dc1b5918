//! Binding of every tensor the forward pass reads, by ds4's GGUF names (ds4-spec.md §1), with
//! type and shape checks against the model description.
//!
//! Large matrices stay in the (memory-mapped) file and are described by a [`Matrix`] view;
//! small vectors (norm weights, biases, slot biases, routing tables) are decoded to f32/i32
//! once at load. GGUF dims are [in, out]: dim0 is the contiguous row length.

use std::sync::Arc;

use ds4_gguf::quant;
use ds4_gguf::reader::{GgufFile, TensorInfo};
use ds4_gguf::GgmlType;

use crate::config::{AttnKind, ModelConfig, MoeKind};

/// A problem with one tensor of the model file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tensor `{tensor}`: {problem}")]
pub struct WeightError {
    pub tensor: String,
    pub problem: String,
}

fn werr(tensor: &str, problem: impl Into<String>) -> WeightError {
    WeightError {
        tensor: tensor.to_string(),
        problem: problem.into(),
    }
}

/// Weight types a matrix may have.
const MATRIX_TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q4K,
    GgmlType::IQ2XXS,
];

/// A row-major matrix stored in the model file: `rows` rows of `cols` elements of type `ty`,
/// starting at absolute byte `offset` of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub row_bytes: usize,
}

impl Matrix {
    /// The bytes of row `r` within the file's bytes.
    #[inline]
    pub fn row<'a>(&self, file: &'a [u8], r: usize) -> &'a [u8] {
        let start = self.offset + r * self.row_bytes;
        &file[start..start + self.row_bytes]
    }

    /// Rows [start, start + n) as a matrix of their own.
    pub fn rows_range(&self, start: usize, n: usize) -> Matrix {
        debug_assert!(start + n <= self.rows);
        Matrix {
            name: self.name.clone(),
            ty: self.ty,
            rows: n,
            cols: self.cols,
            offset: self.offset + start * self.row_bytes,
            row_bytes: self.row_bytes,
        }
    }

    /// Bytes read per use of the whole matrix.
    pub fn n_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

/// The stacked experts of one projection: expert e is a `rows` × `cols` matrix starting at
/// `e · rows · row_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertMatrices {
    pub all: Matrix,
    pub n_experts: usize,
    pub rows: usize,
}

impl ExpertMatrices {
    pub fn expert(&self, e: usize) -> Matrix {
        self.all.rows_range(e * self.rows, self.rows)
    }
}

/// A compressor's weights (attention or indexer).
#[derive(Clone, Debug)]
pub struct CompressorWeights {
    pub kv: Matrix,
    pub gate: Matrix,
    /// Slot bias, m × (c·D), row-major.
    pub ape: Vec<f32>,
    pub norm: Vec<f32>,
}

/// The lightning indexer's weights (CSA layers).
#[derive(Clone, Debug)]
pub struct IndexerWeights {
    pub compressor: CompressorWeights,
    /// n_I·d_I × q'.
    pub q_b: Matrix,
    /// n_I × d.
    pub proj: Matrix,
}

/// One hyper-connection's parameters.
#[derive(Clone, Debug)]
pub struct HcWeights {
    /// (2+n)·n × n·d.
    pub fn_: Matrix,
    pub base: Vec<f32>,
    pub scale: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub hc_attn: HcWeights,
    pub hc_ffn: HcWeights,
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub q_a: Matrix,
    pub q_a_norm: Vec<f32>,
    pub q_b: Matrix,
    pub kv: Matrix,
    pub kv_norm: Vec<f32>,
    pub sinks: Vec<f32>,
    pub o_a: Matrix,
    pub o_b: Matrix,
    pub compressor: Option<CompressorWeights>,
    pub indexer: Option<IndexerWeights>,
    pub router: Matrix,
    pub router_bias: Option<Vec<f32>>,
    /// vocab × k expert ids (hash layers).
    pub tid2eid: Option<Vec<i32>>,
    pub gate_exps: ExpertMatrices,
    pub up_exps: ExpertMatrices,
    pub down_exps: ExpertMatrices,
    pub gate_shexp: Matrix,
    pub up_shexp: Matrix,
    pub down_shexp: Matrix,
}

/// Every tensor of the model, bound and checked.
pub struct ModelWeights {
    pub file: Arc<GgufFile>,
    /// vocab × d.
    pub embed: Matrix,
    pub output_hc: HcWeights,
    pub output_norm: Vec<f32>,
    /// vocab × d.
    pub output: Matrix,
    pub layers: Vec<LayerWeights>,
}

impl ModelWeights {
    /// Binds every tensor the forward pass of `cfg` needs.
    pub fn bind(file: Arc<GgufFile>, cfg: &ModelConfig) -> Result<ModelWeights, WeightError> {
        let b = Binder { file: &file };
        let d = cfg.hidden;
        let n = cfg.hc_mult;
        let hc_rows = (2 + n) * n;
        let embed = b.matrix("token_embd.weight", cfg.vocab_size, d)?;
        let output_hc = HcWeights {
            fn_: b.matrix("output_hc_fn.weight", n, n * d)?,
            base: b.vector("output_hc_base.weight", &[n])?,
            scale: b.vector("output_hc_scale.weight", &[1])?,
        };
        let output_norm = b.vector("output_norm.weight", &[d])?;
        let output = b.matrix("output.weight", cfg.vocab_size, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}");
            let hc = |kind: &str| -> Result<HcWeights, WeightError> {
                Ok(HcWeights {
                    fn_: b.matrix(&name(&format!("hc_{kind}_fn.weight")), hc_rows, n * d)?,
                    base: b.vector(&name(&format!("hc_{kind}_base.weight")), &[hc_rows])?,
                    scale: b.vector(&name(&format!("hc_{kind}_scale.weight")), &[3])?,
                })
            };
            let (hd, h) = (cfg.head_dim, cfg.n_heads);
            let ratio = cfg.compress_ratio[l] as usize;
            let compressor = match cfg.attn_kind[l] {
                AttnKind::Sliding => None,
                kind => {
                    let c = if kind == AttnKind::Csa { 2 } else { 1 };
                    Some(CompressorWeights {
                        kv: b.matrix(&name("attn_compressor_kv.weight"), c * hd, d)?,
                        gate: b.matrix(&name("attn_compressor_gate.weight"), c * hd, d)?,
                        ape: b.vector(&name("attn_compressor_ape.weight"), &[c * hd, ratio])?,
                        norm: b.vector(&name("attn_compressor_norm.weight"), &[hd])?,
                    })
                }
            };
            let indexer = if cfg.attn_kind[l] == AttnKind::Csa {
                let (ni, di) = (cfg.index_heads, cfg.index_head_dim);
                Some(IndexerWeights {
                    compressor: CompressorWeights {
                        kv: b.matrix(&name("indexer_compressor_kv.weight"), 2 * di, d)?,
                        gate: b.matrix(&name("indexer_compressor_gate.weight"), 2 * di, d)?,
                        ape: b.vector(&name("indexer_compressor_ape.weight"), &[2 * di, ratio])?,
                        norm: b.vector(&name("indexer_compressor_norm.weight"), &[di])?,
                    },
                    q_b: b.matrix(&name("indexer.attn_q_b.weight"), ni * di, cfg.q_lora_rank)?,
                    proj: b.matrix(&name("indexer.proj.weight"), ni, d)?,
                })
            } else {
                None
            };
            let (e, ff, k) = (cfg.n_experts, cfg.expert_ff, cfg.n_experts_used);
            let tid2eid = match cfg.moe_kind[l] {
                MoeKind::Hash => {
                    let tname = name("ffn_gate_tid2eid.weight");
                    let table = b.i32_table(&tname, &[k, cfg.vocab_size])?;
                    if let Some(bad) = table.iter().find(|&&x| x < 0 || x as usize >= e) {
                        return Err(werr(&tname, format!("expert id {bad} outside 0..{e}")));
                    }
                    Some(table)
                }
                MoeKind::TopK => None,
            };
            let router_bias = if b.file.tensor(&name("exp_probs_b.bias")).is_some() {
                Some(b.vector(&name("exp_probs_b.bias"), &[e])?)
            } else {
                None
            };
            layers.push(LayerWeights {
                hc_attn: hc("attn")?,
                hc_ffn: hc("ffn")?,
                attn_norm: b.vector(&name("attn_norm.weight"), &[d])?,
                ffn_norm: b.vector(&name("ffn_norm.weight"), &[d])?,
                q_a: b.matrix(&name("attn_q_a.weight"), cfg.q_lora_rank, d)?,
                q_a_norm: b.vector(&name("attn_q_a_norm.weight"), &[cfg.q_lora_rank])?,
                q_b: b.matrix(&name("attn_q_b.weight"), h * hd, cfg.q_lora_rank)?,
                kv: b.matrix(&name("attn_kv.weight"), hd, d)?,
                kv_norm: b.vector(&name("attn_kv_a_norm.weight"), &[hd])?,
                sinks: b.vector(&name("attn_sinks.weight"), &[h])?,
                o_a: b.matrix(
                    &name("attn_output_a.weight"),
                    cfg.o_groups * cfg.o_lora_rank,
                    h * hd / cfg.o_groups,
                )?,
                o_b: b.matrix(
                    &name("attn_output_b.weight"),
                    d,
                    cfg.o_groups * cfg.o_lora_rank,
                )?,
                compressor,
                indexer,
                router: b.matrix(&name("ffn_gate_inp.weight"), e, d)?,
                router_bias,
                tid2eid,
                gate_exps: b.experts(&name("ffn_gate_exps.weight"), e, ff, d)?,
                up_exps: b.experts(&name("ffn_up_exps.weight"), e, ff, d)?,
                down_exps: b.experts(&name("ffn_down_exps.weight"), e, d, ff)?,
                gate_shexp: b.matrix(&name("ffn_gate_shexp.weight"), ff, d)?,
                up_shexp: b.matrix(&name("ffn_up_shexp.weight"), ff, d)?,
                down_shexp: b.matrix(&name("ffn_down_shexp.weight"), d, ff)?,
            });
        }
        Ok(ModelWeights {
            file,
            embed,
            output_hc,
            output_norm,
            output,
            layers,
        })
    }

    /// The whole file's bytes (matrix offsets are absolute).
    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    /// Decodes row `r` of a matrix into `out` (cols floats).
    pub fn decode_row(&self, m: &Matrix, r: usize, out: &mut [f32]) {
        // Types and sizes were checked at bind time, so decoding cannot fail.
        let _ = quant::dequantize(m.ty, m.row(self.bytes(), r), out);
    }
}

struct Binder<'a> {
    file: &'a GgufFile,
}

impl Binder<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, WeightError> {
        self.file
            .tensor(name)
            .ok_or_else(|| werr(name, "missing from the model file"))
    }

    fn check_dims(&self, t: &TensorInfo, want: &[usize]) -> Result<(), WeightError> {
        let dims: Vec<usize> = t.dims.iter().map(|&v| v as usize).collect();
        // Trailing 1-sized dims are equivalent (a [n] vector may be written as [n, 1]).
        let trim = |v: &[usize]| {
            let mut v = v.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if trim(&dims) != trim(want) {
            return Err(werr(&t.name, format!("shape {dims:?}, expected {want:?}")));
        }
        Ok(())
    }

    fn absolute_offset(&self, t: &TensorInfo) -> usize {
        (self.file.data_offset() + t.offset) as usize
    }

    /// A `rows` × `cols` matrix (GGUF dims [cols, rows]).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        let t = self.info(name)?;
        if !MATRIX_TYPES.contains(&t.ty) {
            return Err(werr(
                name,
                format!("type {} cannot be used as a weight matrix", t.ty),
            ));
        }
        self.check_dims(t, &[cols, rows])?;
        Ok(Matrix {
            name: name.to_string(),
            ty: t.ty,
            rows,
            cols,
            offset: self.absolute_offset(t),
            row_bytes: t.row_bytes() as usize,
        })
    }

    /// `n_experts` stacked `rows` × `cols` matrices (GGUF dims [cols, rows, n_experts]).
    fn experts(
        &self,
        name: &str,
        n_experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<ExpertMatrices, WeightError> {
        let t = self.info(name)?;
        if !MATRIX_TYPES.contains(&t.ty) {
            return Err(werr(
                name,
                format!("type {} cannot be used as expert weights", t.ty),
            ));
        }
        self.check_dims(t, &[cols, rows, n_experts])?;
        Ok(ExpertMatrices {
            all: Matrix {
                name: name.to_string(),
                ty: t.ty,
                rows: rows * n_experts,
                cols,
                offset: self.absolute_offset(t),
                row_bytes: t.row_bytes() as usize,
            },
            n_experts,
            rows,
        })
    }

    /// A small float tensor of the given GGUF dims, decoded to f32.
    fn vector(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>, WeightError> {
        let t = self.info(name)?;
        if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(werr(
                name,
                format!("type {}, expected F32, F16 or BF16", t.ty),
            ));
        }
        self.check_dims(t, dims)?;
        let mut out = vec![0f32; dims.iter().product()];
        quant::dequantize(t.ty, self.file.tensor_bytes(t), &mut out)
            .map_err(|e| werr(name, e.to_string()))?;
        Ok(out)
    }

    fn i32_table(&self, name: &str, dims: &[usize]) -> Result<Vec<i32>, WeightError> {
        let t = self.info(name)?;
        if t.ty != GgmlType::I32 {
            return Err(werr(name, format!("type {}, expected I32", t.ty)));
        }
        self.check_dims(t, dims)?;
        Ok(self
            .file
            .tensor_bytes(t)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
