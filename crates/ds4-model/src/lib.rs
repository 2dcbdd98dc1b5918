//! ds4-model

pub mod config;
pub mod numerics;
