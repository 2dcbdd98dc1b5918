#!/usr/bin/env python3
"""Write the quant-format fixtures that crates/ds4-gguf/tests/quant_fixtures.rs checks against.

Oracle: the `gguf` Python package, version 0.19.0 (`pip install gguf==0.19.0 numpy`).
Output (little-endian), in tests/fixtures/quants/:

  dequant_<TYPE>.bin  b"DS4QDQ01", u32 ggml type id, u32 n_blocks,
                      n_blocks raw blocks, then n_blocks*block_elems f32 = gguf.quants.dequantize
  quant_<TYPE>.bin    b"DS4QQ001", u32 ggml type id, u32 n_elems,
                      n_elems f32 input, then the bytes of gguf.quants.quantize(input)

Block formats get random bytes with every f16 scale field replaced by a random finite f16
(NaN/Inf excluded; zero, subnormal and negative scales included). The first IQ2_XXS blocks
walk every codebook index and every sign index, so the codebook table is checked entry by entry.
gguf-py 0.19 quantizes only F32/F16/BF16/Q8_0 among ds4's types (Q2_K, Q4_K, IQ2_XXS have
dequantizers only; Q8_K has neither), so only those get quantize fixtures.

Run from the repository root:  python3 scripts/gguf/make_quant_fixtures.py
"""

import os
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

SEED = 20260521
OUT = os.path.join("tests", "fixtures", "quants")
N_BLOCKS = 1024
N_FLOAT = 8192


def random_finite_f16(rng, n):
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    while bad.any():
        bits[bad] = rng.integers(0, 1 << 16, size=int(bad.sum()), dtype=np.uint32).astype(np.uint16)
        bad = (bits & 0x7C00) == 0x7C00
    return bits


def random_blocks(rng, qtype, scale_offsets):
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N_BLOCKS, type_size), dtype=np.uint32).astype(np.uint8)
    for off in scale_offsets:
        raw[:, off:off + 2] = random_finite_f16(rng, N_BLOCKS).view(np.uint8).reshape(N_BLOCKS, 2)
    return raw


def iq2_xxs_blocks(rng):
    raw = random_blocks(rng, T.IQ2_XXS, [0])
    # 8 blocks × 8 sub-blocks × 4 groups = 256 groups: group g uses codebook index g and
    # sign index g % 128.
    for b in range(8):
        for ib in range(8):
            words = raw[b, 2 + 8 * ib:10 + 8 * ib].copy().view(np.uint32)
            g0 = 32 * b + 4 * ib
            a0 = sum((g0 + l) << (8 * l) for l in range(4))
            a1 = sum(((g0 + l) % 128) << (7 * l) for l in range(4)) | (int(words[1]) & 0xF0000000)
            raw[b, 2 + 8 * ib:10 + 8 * ib] = np.array([a0, a1], dtype=np.uint32).view(np.uint8)
    return raw


def write_dequant(name, qtype, raw):
    expected = gguf.quants.dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = raw.size // type_size
    assert expected.size == n_blocks * block_size
    assert np.isfinite(expected).all(), name
    path = os.path.join(OUT, f"dequant_{name}.bin")
    with open(path, "wb") as f:
        f.write(b"DS4QDQ01")
        f.write(struct.pack("<II", int(qtype), n_blocks))
        f.write(raw.astype(np.uint8).tobytes())
        f.write(expected.astype("<f4").tobytes())
    print(f"{path}: {n_blocks} blocks")


def write_quant(name, qtype, x):
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):  # F16 overflow to inf is one of the cases
        q = gguf.quants.quantize(x.reshape(1, -1), qtype).reshape(-1).view(np.uint8)
    path = os.path.join(OUT, f"quant_{name}.bin")
    with open(path, "wb") as f:
        f.write(b"DS4QQ001")
        f.write(struct.pack("<II", int(qtype), x.size))
        f.write(x.astype("<f4").tobytes())
        f.write(q.tobytes())
    print(f"{path}: {x.size} elements -> {q.size} bytes")


def quant_input(rng, n, block):
    """N(0,1) blocks at random magnitudes, plus blocks that hit the edge cases."""
    x = rng.standard_normal(n).astype(np.float32)
    scales = np.exp(rng.uniform(np.log(1e-4), np.log(1e4), size=n // block)).astype(np.float32)
    x = (x.reshape(-1, block) * scales[:, None]).reshape(-1)
    x[:block] = 0.0  # an all-zero block
    # amax 127 gives d = 1 exactly, so the .5 values are exact rounding ties.
    ties = np.array([127.0, -127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 63.5, -63.5], dtype=np.float32)
    x[block:block + ties.size] = ties
    x[block + ties.size:2 * block] = 0.25
    return x


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(SEED)

    write_dequant("Q8_0", T.Q8_0, random_blocks(rng, T.Q8_0, [0]))
    write_dequant("Q2_K", T.Q2_K, random_blocks(rng, T.Q2_K, [80, 82]))
    write_dequant("Q4_K", T.Q4_K, random_blocks(rng, T.Q4_K, [0, 2]))
    write_dequant("IQ2_XXS", T.IQ2_XXS, iq2_xxs_blocks(rng))
    f16 = random_finite_f16(rng, N_FLOAT)
    write_dequant("F16", T.F16, f16.view(np.uint8).reshape(-1, 2))
    bf16 = rng.integers(0, 1 << 16, size=N_FLOAT, dtype=np.uint32).astype(np.uint16)
    bf16[(bf16 & 0x7F80) == 0x7F80] &= 0xBFFF  # drop NaN/Inf exponents
    write_dequant("BF16", T.BF16, bf16.view(np.uint8).reshape(-1, 2))

    write_quant("Q8_0", T.Q8_0, quant_input(rng, N_BLOCKS * 32, 32))
    xf = quant_input(rng, N_FLOAT, 32)
    # F16 edges: overflow to inf, the largest finite, subnormals, and an exact tie.
    xf[-6:] = [70000.0, -65504.0, 3e-6, -1e-7, 1.0 + 2.0 ** -11, 65520.0]
    write_quant("F16", T.F16, xf)
    xb = quant_input(rng, N_FLOAT, 32)
    xb[-5:] = [np.inf, -np.inf, np.nan, np.float32(1.0 + 2.0 ** -8), np.float32(1.0 + 3 * 2.0 ** -8)]
    write_quant("BF16", T.BF16, xb)


if __name__ == "__main__":
    import importlib.metadata
    v = importlib.metadata.version("gguf")
    if v != "0.19.0":
        sys.exit(f"this script expects gguf==0.19.0, found {v}")
    main()
