#!/usr/bin/env python3
"""The machine's ceilings beside the benchmarks: f32 GEMM GFLOP/s through numpy (OpenBLAS) with
`--threads` threads, and memory bandwidth as a large buffer copy (bytes read + written per second);
with `--gguf`, the bytes of weights a one-row decoding step of that model reads (every tensor once,
as stored; an untied model's embedding one row). Prints one JSON line.

usage: ceilings.py [--threads 2] [--n 2048] [--mb 512] [--gguf MODEL.gguf]
"""
import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--gguf")
    args = ap.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import time

    import numpy as np

    n = args.n
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    gemm = 2 * n**3 / best / 1e9
    x = np.ones(args.mb * 1024 * 1024 // 4, dtype=np.float32)
    y = np.empty_like(x)
    np.copyto(y, x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(y, x)
        best = min(best, time.perf_counter() - t0)
    copy = 2 * x.nbytes / best / 1e9
    report = {"gemm_gflops": gemm, "gemm_n": n, "copy_gbps": copy, "copy_mb": args.mb, "threads": args.threads}
    if args.gguf:
        report["decode_bytes_per_token"] = decode_bytes_per_token(args.gguf)
    print(json.dumps(report))


def decode_bytes_per_token(path):
    """Bytes of weights one decoding step of one row reads from a GGUF model: every tensor once,
    in its stored format; with a separate `output.weight`, the token embedding only one row."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        embedding = tensors["token_embd.weight"]
        rows = int(embedding.shape[-1]) if len(embedding.shape) > 1 else 1
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // rows
    return total


if __name__ == "__main__":
    main()
