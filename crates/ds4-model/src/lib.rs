//! ds4-model

pub mod numerics;
