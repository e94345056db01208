#!/usr/bin/env python3
"""Write a copy of a GGUF file whose 2-D quantized tensors are re-quantized to another type by the
gguf package (gguf.quants.quantize, from the tensors dequantized by gguf.quants.dequantize);
metadata (vocabulary, chat template ...) and the float tensors are copied as they are. Used to
make the Q8_0 SmolLM2 file that tools/bench.py --gguf compares with llama.cpp:

    python tools/gguf_requant.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/SmolLM2-135M-Instruct.Q8_0.gguf --type Q8_0

(the weights are then Q8_0 of the Q4_1 values, not of the original f32 ones: the same bytes per
weight and kernels as a downloaded Q8_0 file, a different rounding.) The types gguf can quantize:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32.
"""

from __future__ import annotations

import argparse

import numpy as np


def requant(src: str, dst: str, qtype: str) -> None:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize
    target = GGMLQuantizationType[qtype]
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_array(name, field.contents())
        elif name == "general.file_type" and qtype == "Q8_0":
            w.add_uint32(name, 7)                                     # LLAMA_FTYPE_MOSTLY_Q8_0
        else:
            w.add_key_value(name, field.contents(), vtype)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # numpy order (rows, cols)
        if t.tensor_type.name in ("F32", "F16", "BF16") or len(shape) != 2:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        f = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)   # (N, K)
        w.add_tensor(t.name, quantize(f, target), raw_dtype=target)             # (N, K // 32 * 34) bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--type", default="Q8_0", help="target type of the quantized tensors (default Q8_0)")
    a = p.parse_args()
    requant(a.src, a.dst, a.type)


if __name__ == "__main__":
    main()
