#!/usr/bin/env python3
"""Writes crates/ds4-gguf/tests/fixtures/gguf_py_written.gguf with gguf-py's GGUFWriter
(PyPI gguf==0.19.0), so `cargo test -p ds4-gguf --test reader_gguf_py` checks that our reader
understands a file written by another implementation. The values are fixed; the Rust test
states the same values. Regenerate (from the repository root):

    python3 scripts/gguf/make_reader_fixture.py
"""

from pathlib import Path

import numpy as np
import gguf

OUT = Path(__file__).resolve().parents[2] / "crates/ds4-gguf/tests/fixtures/gguf_py_written.gguf"


def main():
    w = gguf.GGUFWriter(str(OUT), "deepseek4")
    w.add_custom_alignment(64)  # sets the data alignment and writes general.alignment
    w.add_uint32("deepseek4.block_count", 43)
    w.add_int32("x.i32", -5)
    w.add_uint64("x.u64", 2**63 + 1)
    w.add_float32("x.f32", 1e-6)
    w.add_float64("x.f64", 0.1)
    w.add_bool("x.bool", True)
    w.add_string("x.str", "<｜User｜>")
    w.add_array("x.tokens", ["<｜begin▁of▁sentence｜>", "Ġa", "b c"])
    w.add_key_value("x.ratios", [0, 0, 4, 128], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_array("x.clamp", [10.0, 10.0])  # gguf-py stores python floats as FLOAT32
    w.add_array("x.nested", [[1, 2], [3]])  # INT32 inner arrays
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", (np.arange(64, dtype=np.float32) / 8).astype(np.float16).reshape(2, 32))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(1, 6) - 3)
    q = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
