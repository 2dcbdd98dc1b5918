//! ds4-server (being written; the API modules join once ds4-text's chat/DSML/sampler land).

pub mod ids;
pub mod job;
pub mod runner;
pub mod stops;
pub mod testing;
pub mod tool_memory;
pub mod trace;
