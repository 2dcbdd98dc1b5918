//! ds4-text
