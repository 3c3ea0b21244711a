#!/usr/bin/env python3
"""An independent float32 reference for a llama GGUF: the `gguf` package dequantises the weights,
numpy runs the forward pass with llama.cpp's own conventions (GGUF tensor layout, interleaved-pair
RoPE on the permuted Q/K rows). Unlike llama.cpp it keeps activations in f32, so it isolates what
chorus computes from llama.cpp's activation quantisation.

Writes the same JSON layout as llama_cpp_reference.py (prompts from that file, their token ids,
last-position logits and a greedy continuation), so `chorus check-reference` reads either.

usage: numpy_reference.py MODEL.gguf LLAMA_CPP_REFERENCE.json OUT.json [--greedy 20]
"""
import argparse
import json

import numpy as np
from gguf import GGUFReader, dequantize


def field(reader, key):
    return reader.fields[key].contents()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("llama_cpp_reference")
    ap.add_argument("out")
    ap.add_argument("--greedy", type=int, default=20)
    args = ap.parse_args()

    r = GGUFReader(args.model)
    n_layers = field(r, "llama.block_count")
    n_heads = field(r, "llama.attention.head_count")
    n_kv = field(r, "llama.attention.head_count_kv")
    theta = field(r, "llama.rope.freq_base")
    eps = field(r, "llama.attention.layer_norm_rms_epsilon")
    w = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # outermost first: [out, in]
        w[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    d_model = w["token_embd.weight"].shape[1]
    hd = d_model // n_heads
    out_w = w.get("output.weight", w["token_embd.weight"])

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x, positions):  # x [seq, heads, hd]; llama.cpp "norm" mode: pairs (2i, 2i+1)
        inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = positions[:, None].astype(np.float64) * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(ids):
        seq = len(ids)
        pos = np.arange(seq)
        x = w["token_embd.weight"][ids]
        causal = np.triu(np.full((seq, seq), -np.inf, dtype=np.float32), 1)
        for i in range(n_layers):
            p = f"blk.{i}."
            h = rms(x, w[p + "attn_norm.weight"])
            q = rope((h @ w[p + "attn_q.weight"].T).reshape(seq, n_heads, hd), pos)
            k = rope((h @ w[p + "attn_k.weight"].T).reshape(seq, n_kv, hd), pos)
            v = (h @ w[p + "attn_v.weight"].T).reshape(seq, n_kv, hd)
            k = np.repeat(k, n_heads // n_kv, axis=1)
            v = np.repeat(v, n_heads // n_kv, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = scores / scores.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", att, v).reshape(seq, d_model)
            x = x + o @ w[p + "attn_output.weight"].T
            h = rms(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            up = h @ w[p + "ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
        x = rms(x, w["output_norm.weight"])
        return x[-1] @ out_w.T

    ref = json.load(open(args.llama_cpp_reference))
    prompts = []
    for p in ref["prompts"]:
        ids = list(p["tokens"])
        logits = forward(ids)
        greedy = [int(np.argmax(logits))]
        while len(greedy) < args.greedy:
            greedy.append(int(np.argmax(forward(ids + greedy))))
        prompts.append({"text": p["text"], "tokens": p["tokens"], "logits": logits.tolist(), "greedy": greedy})
        print(f"{p['text'][:40]!r}: top-1 {greedy[0]}")
    zero = {"load_s": 0.0, "prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0, "peak_rss_mb": 0.0}
    with open(args.out, "w") as f:
        # An f32 forward on the same dequantised weights: logits equal chorus's up to f32 rounding
        # (≈ 1e-4 at magnitudes 10–30), the |Δlogit| `chorus check-reference` accepts by default.
        json.dump({"model": args.model, "logit_tolerance": 1e-3, "prompts": prompts,
                   "tokenizer": ref["tokenizer"], "timing": zero}, f)


if __name__ == "__main__":
    main()
