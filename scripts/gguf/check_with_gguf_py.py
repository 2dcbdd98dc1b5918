#!/usr/bin/env python3
"""Cross-check ds4-gguf's writer against the reference GGUF reader (PyPI gguf==0.19.0).

The Rust test `export_for_python_check` (crates/ds4-gguf/tests/writer_roundtrip.rs) writes
DIR/sample.gguf, a file with every metadata value type, one tensor of every ggml type ds4 uses
and an aliased tensor, plus DIR/sample.json describing what it wrote. This script opens the
.gguf with gguf.GGUFReader and asserts that the metadata (types and values, nested arrays
included), the tensor names, types, shapes, offsets and bytes match the description exactly.
Exit status 0 = match, 1 = mismatch (each difference is printed), 2 = usage error.

Run (from the repository root):

    DS4_GGUF_PYCHECK_DIR=target/gguf-pycheck \
        cargo test -p ds4-gguf --test writer_roundtrip export_for_python_check
    python3 scripts/gguf/check_with_gguf_py.py target/gguf-pycheck/sample.gguf

The JSON path defaults to the .gguf path with a .json suffix; pass it as a second argument to
override. Floats in the JSON are IEEE bit patterns (exact, and safe for inf).
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

# GGUF value type names as the JSON writes them (the spec's names) -> gguf-py enum.
TYPE_BY_NAME = {
    "UINT8": GGUFValueType.UINT8,
    "INT8": GGUFValueType.INT8,
    "UINT16": GGUFValueType.UINT16,
    "INT16": GGUFValueType.INT16,
    "UINT32": GGUFValueType.UINT32,
    "INT32": GGUFValueType.INT32,
    "FLOAT32": GGUFValueType.FLOAT32,
    "BOOL": GGUFValueType.BOOL,
    "STRING": GGUFValueType.STRING,
    "ARRAY": GGUFValueType.ARRAY,
    "UINT64": GGUFValueType.UINT64,
    "INT64": GGUFValueType.INT64,
    "FLOAT64": GGUFValueType.FLOAT64,
}

PSEUDO_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def decode(vtype, parts, i):
    """Decodes one value of GGUF type `vtype` from gguf-py's flat list of field parts,
    starting at parts[i]. Returns (value in the JSON's form, next index). Arrays become
    {"elem_type", "items"}, floats their bit patterns, as the Rust side writes them."""
    if vtype == GGUFValueType.STRING:
        # parts: u64 length, bytes
        return bytes(parts[i + 1]).decode("utf-8"), i + 2
    if vtype == GGUFValueType.ARRAY:
        elem = GGUFValueType(int(parts[i][0]))
        count = int(parts[i + 1][0])
        j = i + 2
        items = []
        for _ in range(count):
            v, j = decode(elem, parts, j)
            items.append(v)
        return {"elem_type": elem.name, "items": items}, j
    x = parts[i][0]
    if vtype == GGUFValueType.FLOAT32:
        return f32_bits(x), i + 1
    if vtype == GGUFValueType.FLOAT64:
        return f64_bits(x), i + 1
    if vtype == GGUFValueType.BOOL:
        return bool(x), i + 1
    return int(x), i + 1


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    gguf_path = Path(argv[1])
    json_path = Path(argv[2]) if len(argv) == 3 else gguf_path.with_suffix(".json")
    expected = json.loads(json_path.read_text(encoding="utf-8"))
    reader = GGUFReader(gguf_path)
    errors = []

    def check(cond, msg):
        if not cond:
            errors.append(msg)

    check(int(reader.alignment) == expected["alignment"],
          f"alignment {reader.alignment} != {expected['alignment']}")
    check(int(reader.data_offset) == expected["data_offset"],
          f"data offset {reader.data_offset} != {expected['data_offset']}")

    # Metadata: same keys in the same order, same types, same values.
    fields = [(k, f) for k, f in reader.fields.items() if k not in PSEUDO_FIELDS]
    got_keys = [k for k, _ in fields]
    want_keys = [m["key"] for m in expected["metadata"]]
    check(got_keys == want_keys, f"metadata keys differ:\n  gguf-py {got_keys}\n  rust    {want_keys}")
    by_key = dict(fields)
    for m in expected["metadata"]:
        field = by_key.get(m["key"])
        if field is None:
            continue
        vtype = GGUFValueType(int(field.parts[2][0]))  # parts: key len, key, value type, value...
        check(vtype == TYPE_BY_NAME[m["type"]], f"{m['key']}: type {vtype.name} != {m['type']}")
        value, end = decode(vtype, field.parts, 3)
        check(end == len(field.parts), f"{m['key']}: {len(field.parts) - end} undecoded parts")
        check(value == m["value"], f"{m['key']}: value {value!r} != {m['value']!r}")
        # gguf-py's own accessor agrees for scalars, strings and flat arrays.
        if vtype in (GGUFValueType.STRING,):
            check(field.contents() == m["value"], f"{m['key']}: contents() differs")
        elif vtype == GGUFValueType.ARRAY and m["value"]["elem_type"] == "STRING":
            check(field.contents() == m["value"]["items"], f"{m['key']}: contents() differs")

    # Tensors: names, types, shapes, offsets, sizes and bytes.
    got_names = [t.name for t in reader.tensors]
    want_names = [t["name"] for t in expected["tensors"]]
    check(got_names == want_names, f"tensor names differ:\n  gguf-py {got_names}\n  rust    {want_names}")
    by_name = {t.name: t for t in reader.tensors}
    for t in expected["tensors"]:
        r = by_name.get(t["name"])
        if r is None:
            continue
        name = t["name"]
        check(int(r.tensor_type) == t["type_id"], f"{name}: type {r.tensor_type!r} != {t['type']}")
        check(r.tensor_type.name == t["type"], f"{name}: type name {r.tensor_type.name} != {t['type']}")
        check([int(d) for d in r.shape] == t["dims"], f"{name}: shape {list(r.shape)} != {t['dims']}")
        check(int(r.n_bytes) == t["n_bytes"], f"{name}: n_bytes {r.n_bytes} != {t['n_bytes']}")
        check(int(r.data_offset) == expected["data_offset"] + t["offset"],
              f"{name}: data offset {r.data_offset} != {expected['data_offset'] + t['offset']}")
        data = np.ascontiguousarray(r.data).tobytes()
        check(data.hex() == t["data_hex"], f"{name}: data bytes differ")

    if errors:
        for e in errors:
            print("MISMATCH:", e)
        print(f"{len(errors)} mismatches between gguf-py and {json_path}")
        return 1
    print(f"ok: {gguf_path}: {len(expected['metadata'])} metadata pairs, "
          f"{len(expected['tensors'])} tensors match gguf-py {reader.__class__.__module__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
