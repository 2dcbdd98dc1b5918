//! ds4-model

pub mod config;
pub mod cpu;
pub mod numerics;
pub mod weights;
pub mod backend;
pub mod session;
pub mod npy;
pub mod convert;
pub mod layout;
pub mod synth;
pub mod bench;
