#!/usr/bin/env python3
"""Peers of `chorus bench-score`: score the same `--batch` rows of `--seq + 1` token ids (the
pattern of chorus's `score_token`: (r·7919 + t·104729 + 13) mod vocab) with a GGUF model — the
log-probability of each next token — and print one JSON line like chorus's: scored tokens/s and
the mean NLL (equal to chorus's up to rounding for `torch`; llama.cpp quantises activations to 8
bits in its Q4_1 kernels, so its NLL differs slightly).

- `--peer torch`: PyTorch eager (f32 on the CPU; `--device cuda` with `--dtype f32|tf32|bf16`),
  the GGUF's weights dequantised by the `gguf` package into the llama of train_step.py (Q/K rows
  un-permuted back to the HF layout), one batched forward;
- `--peer llama_cpp`: llama-cpp-python on the GGUF itself (its Q4_1 kernels), one row at a time
  with `logits_all`, log-softmax in numpy.

GGUF may also name a shape of train_step.py (`small`, `smollm2`): random weights of that shape, as
`chorus bench-score --shape` (no NLL check then: the two draw different weights).

usage: score.py GGUF --peer torch|llama_cpp [--batch 8] [--seq 128] [--repeats 3] [--threads 2]
                [--device cpu|cuda] [--dtype f32|tf32|bf16]
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np


def rows(batch, seq, vocab):
    return np.array([[(r * 7919 + t * 104729 + 13) % vocab for t in range(seq + 1)]
                     for r in range(batch)], dtype=np.int64)


def torch_scorer(path, threads, device, dtype):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import Llama, SHAPES

    torch.set_num_threads(threads)
    if path in SHAPES:  # random weights of a shape, as `chorus bench-score --shape`
        torch.manual_seed(0)
        return place(Llama(*SHAPES[path]), device, dtype)
    from gguf import GGUFReader, dequantize
    r = GGUFReader(path)
    field = lambda key: r.fields[key].contents()
    n_layers, heads = field("llama.block_count"), field("llama.attention.head_count")
    kv_heads, theta = field("llama.attention.head_count_kv"), field("llama.rope.freq_base")
    w = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # [out, in]
        w[t.name] = torch.from_numpy(
            np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape).copy())
    vocab, d = w["token_embd.weight"].shape
    d_ff = w["blk.0.ffn_gate.weight"].shape[0]
    hd = d // heads
    model = Llama(vocab, d, n_layers, heads, kv_heads, d_ff, theta=theta)

    def unpermute(x, n):  # llama.cpp's interleaved Q/K rows back to HF's rotate-half layout
        return x.reshape(n, hd // 2, 2, d).transpose(1, 2).reshape(n * hd, d)

    with torch.no_grad():
        model.embed_tokens.weight.copy_(w["token_embd.weight"])
        model.norm.weight.copy_(w["output_norm.weight"])
        for i, layer in enumerate(model.layers):
            g = lambda name: w[f"blk.{i}.{name}.weight"]
            layer.input_layernorm.weight.copy_(g("attn_norm"))
            layer.post_attention_layernorm.weight.copy_(g("ffn_norm"))
            layer.q_proj.weight.copy_(unpermute(g("attn_q"), heads))
            layer.k_proj.weight.copy_(unpermute(g("attn_k"), kv_heads))
            layer.v_proj.weight.copy_(g("attn_v"))
            layer.o_proj.weight.copy_(g("attn_output"))
            layer.gate_proj.weight.copy_(g("ffn_gate"))
            layer.up_proj.weight.copy_(g("ffn_up"))
            layer.down_proj.weight.copy_(g("ffn_down"))
    for norm in [model.norm] + [m for l in model.layers
                                for m in (l.input_layernorm, l.post_attention_layernorm)]:
        norm.eps = field("llama.attention.layer_norm_rms_epsilon")
    return place(model, device, dtype)


def place(model, device, dtype):
    import torch
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    model = model.to(dev, torch.bfloat16 if dtype == "bf16" else torch.float32)

    def score(ids):
        ids = torch.from_numpy(ids).to(dev)
        with torch.inference_mode():
            logits = model(ids[:, :-1]).float()
            lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])
        return -float(lp.sum())  # reads the result back: the device is done

    where = f"{torch.get_num_threads()} threads" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    vocab = model.embed_tokens.weight.shape[0]
    return vocab, score, f"pytorch {torch.__version__} eager {dtype}, {where}"


def llama_cpp_scorer(path, threads, seq):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=seq + 1, n_batch=seq + 1, n_threads=threads,
                          logits_all=True, verbose=False)

    def score(ids):
        nll = 0.0
        for row in ids:
            llm.reset()
            llm.eval(row[:-1].tolist())
            logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
            m = logits.max(-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
            nll -= float((logits[np.arange(len(row) - 1), row[1:]] - lse).sum())
        return nll

    # The widest vectors the build was compiled for (`cargo xtask bench` builds AVX-512 where the CPU
    # has it, else DATA.md's AVX2 build).
    vectors = "AVX-512" if "AVX512 = 1" in llama_cpp.llama_print_system_info().decode() else "AVX2"
    return llm.n_vocab(), score, f"llama.cpp {llama_cpp.__version__} ({vectors}), Q4_1 kernels, {threads} threads"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", help="a GGUF file, or a shape of train_step.py (random weights; torch only)")
    ap.add_argument("--peer", choices=["torch", "llama_cpp"], required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch only: cpu or cuda")
    ap.add_argument("--dtype", choices=["f32", "tf32", "bf16"], default="f32",
                    help="torch only; tf32: f32 weights, TF32 matmuls (CUDA)")
    args = ap.parse_args()
    if args.peer == "torch":
        vocab, score, system = torch_scorer(args.gguf, args.threads, args.device, args.dtype)
    else:
        vocab, score, system = llama_cpp_scorer(args.gguf, args.threads, args.seq)
    ids = rows(args.batch, args.seq, vocab)
    t0 = time.perf_counter()
    score(ids)  # warm-up
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        nll = score(ids)
    seconds = (time.perf_counter() - t0) / args.repeats
    n = args.batch * args.seq
    print(json.dumps({
        "system": system, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "first_pass_s": first, "seconds": seconds, "tokens_per_s": n / seconds, "nll_per_token": nll / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
