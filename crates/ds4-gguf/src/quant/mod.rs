//! Block quant formats (being written)
