//! An activation vector together with its quantized forms, so one quantization serves every
//! row it is dotted with.

use std::sync::OnceLock;

use super::error::QuantError;
use super::q8_0::{quantize_q8_0_activation, BlockQ8_0};
use super::q8_k::{quantize_q8_k_activation, BlockQ8K};
use crate::types::GgmlType;

/// An f32 activation vector and, computed on first use (or supplied up front), its Q8_0 and
/// Q8_K quantizations. It is `Sync`: threads that share it quantize at most once.
#[derive(Debug)]
pub struct Activations<'a> {
    x: &'a [f32],
    q8_0: OnceLock<Vec<BlockQ8_0>>,
    q8_k: OnceLock<Vec<BlockQ8K>>,
}

impl<'a> Activations<'a> {
    /// Wrap `x`; nothing is quantized yet.
    pub fn new(x: &'a [f32]) -> Self {
        Activations {
            x,
            q8_0: OnceLock::new(),
            q8_k: OnceLock::new(),
        }
    }

    /// Wrap `x` with a Q8_0 quantization computed elsewhere (e.g. by ds4-cuda or a batch).
    pub fn with_q8_0(x: &'a [f32], q8_0: Vec<BlockQ8_0>) -> Result<Self, QuantError> {
        check_blocks(GgmlType::Q8_0, x.len(), q8_0.len())?;
        let a = Activations::new(x);
        a.q8_0.set(q8_0).expect("fresh OnceLock");
        Ok(a)
    }

    /// Wrap `x` with a Q8_K quantization computed elsewhere.
    pub fn with_q8_k(x: &'a [f32], q8_k: Vec<BlockQ8K>) -> Result<Self, QuantError> {
        check_blocks(GgmlType::Q8K, x.len(), q8_k.len())?;
        let a = Activations::new(x);
        a.q8_k.set(q8_k).expect("fresh OnceLock");
        Ok(a)
    }

    /// The f32 values.
    pub fn x(&self) -> &'a [f32] {
        self.x
    }

    /// The Q8_0 blocks (ds4's activation quantizer), computed on first call.
    pub fn q8_0(&self) -> Result<&[BlockQ8_0], QuantError> {
        check_blocks(GgmlType::Q8_0, self.x.len(), self.x.len() / 32)?;
        Ok(self.q8_0.get_or_init(|| quantize_q8_0_activation(self.x)))
    }

    /// The Q8_K blocks, computed on first call.
    pub fn q8_k(&self) -> Result<&[BlockQ8K], QuantError> {
        check_blocks(GgmlType::Q8K, self.x.len(), self.x.len() / 256)?;
        Ok(self.q8_k.get_or_init(|| quantize_q8_k_activation(self.x)))
    }
}

fn check_blocks(ty: GgmlType, elems: usize, blocks: usize) -> Result<(), QuantError> {
    let block = ty.block_elems();
    if !elems.is_multiple_of(block) {
        return Err(QuantError::NotWholeBlocks { ty, elems, block });
    }
    if blocks != elems / block {
        return Err(QuantError::SizeMismatch {
            ty,
            what: "activation blocks",
            expected: elems / block,
            actual: blocks,
        });
    }
    Ok(())
}
