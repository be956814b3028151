#!/usr/bin/python3
"""Writes a Hugging Face Llama as a GGUF with Q8_0 or Q4_0 weights, for llama.cpp as the
peer of superpose's int8 / q4 weights (issue 17's benchmark; bench/quant_bench.cc).

The npm llama.cpp ships no quantize tool, and the shared GGUF writer
(../shared/tools/peers/gguf_writer.py) writes unquantized types only: this script runs its
HF -> GGUF converter with every 2-D float32 tensor encoded in ggml's Q8_0 or Q4_0 block
format instead (1-D norm weights, and matrices whose rows are not whole blocks, stay
float32, as llama-quantize leaves them or falls back; the token
embedding and the output matrix are quantized too, as with llama-quantize --pure).

  Q8_0: blocks of 32 along a row: fp16 d = max|x| / 127, then 32 int8 round(x / d).
  Q4_0: blocks of 32: fp16 d = m / -8 (m: the value of largest magnitude, signed), then
        16 bytes, q = min(15, trunc(x / d + 8.5)), byte j = q[j] | q[j + 16] << 4.

Usage: bench/peers/gguf_quant.py HF_DIR OUT.gguf q8_0|q4_0 [--peers DIR]
"""
import argparse
import os
import sys

import numpy as np

GGML_Q4_0, GGML_Q8_0 = 2, 8
FILE_TYPE_Q = {GGML_Q4_0: 2, GGML_Q8_0: 7}  # llama_ftype MOSTLY_Q4_0 / MOSTLY_Q8_0
BLOCK = 32


class BlockSize:
    """Bytes of n elements: n // 32 blocks of `block_bytes` (n * size in the writer)."""

    def __init__(self, block_bytes):
        self.block_bytes = block_bytes

    def __rmul__(self, n):
        if n % BLOCK:
            raise ValueError(f"{n} elements are not whole blocks of {BLOCK}")
        return n // BLOCK * self.block_bytes


def blocks(arr):
    a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    if a.shape[-1] % BLOCK:
        raise ValueError(f"row length {a.shape[-1]} is not a multiple of {BLOCK}")
    return a.reshape(-1, BLOCK)


def encode_q8_0(arr):
    x = blocks(arr)
    amax = np.abs(x).max(axis=1)
    d = amax / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.round(x * inv[:, None]).astype(np.int8)
    out = np.empty((x.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def encode_q4_0(arr):
    x = blocks(arr)
    idx = np.abs(x).argmax(axis=1)
    m = x[np.arange(x.shape[0]), idx]
    d = m / -8.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(x * inv[:, None] + 8.5)).astype(np.uint8)
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("type", choices=["q8_0", "q4_0"])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--peers", default=os.path.join(here, "..", "..", "..", "shared", "tools",
                                                    "peers"))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.peers))
    import gguf_writer as g

    qtype = GGML_Q8_0 if a.type == "q8_0" else GGML_Q4_0
    quant_encode = encode_q8_0 if qtype == GGML_Q8_0 else encode_q4_0
    g.GGML_TYPE_SIZE[qtype] = BlockSize(34 if qtype == GGML_Q8_0 else 18)
    g.GGML_TYPE_NAMES[qtype] = a.type.upper()
    plain_encode = g.GGUFWriter._encode
    plain_add = g.GGUFWriter.add_tensor
    plain_u32 = g.GGUFWriter.add_uint32

    def add_tensor(self, name, data, ggml_type=None, shape=None):
        # Rows that are not whole blocks stay float32 (llama-quantize falls back too).
        if (ggml_type == g.GGML_F32 and shape is not None and len(shape) >= 2
                and shape[-1] % BLOCK == 0):
            ggml_type = qtype
        return plain_add(self, name, data, ggml_type, shape)

    def encode_any(arr, ggml_type, shape):
        if ggml_type == qtype:
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"shape {arr.shape} != declared {shape}")
            return quant_encode(arr)
        return plain_encode(arr, ggml_type, shape)

    def add_uint32(self, key, v):
        if key == "general.file_type":
            v = FILE_TYPE_Q[qtype]
        return plain_u32(self, key, v)

    g.GGUFWriter.add_tensor = add_tensor
    g.GGUFWriter._encode = staticmethod(encode_any)
    g.GGUFWriter.add_uint32 = add_uint32
    g.convert_hf_llama(a.hf_dir, a.out, dtype="f32")


if __name__ == "__main__":
    main()
