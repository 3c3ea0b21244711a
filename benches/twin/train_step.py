#!/usr/bin/env python3
"""PyTorch twin of `chorus bench-step`: the same llama (RMSNorm, RoPE θ 1e4, grouped-query
attention, SwiGLU, tied embeddings, no biases), the same shapes, random tokens, cross-entropy over
every position, AdamW (lr 1e-4, weight decay 0.1); one warm-up step, then `--steps` timed steps.
Prints one JSON line like chorus's.

usage: train_step.py --shape small|smollm2 [--batch 8] [--seq 128] [--steps 5] [--threads 2]
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # vocab, d_model, layers, heads, kv heads, d_ff
    "small": (4096, 256, 4, 8, 4, 688),
    "smollm2": (49152, 576, 30, 9, 3, 1536),
}


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    # x: [batch, heads, seq, head_dim]; rotate halves (the HF llama convention chorus follows).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(torch.nn.Module):
    def __init__(self, d, heads, kv_heads, d_ff):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.input_layernorm = RMSNorm(d)
        self.q_proj = torch.nn.Linear(d, d, bias=False)
        self.k_proj = torch.nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d)
        self.gate_proj = torch.nn.Linear(d, d_ff, bias=False)
        self.up_proj = torch.nn.Linear(d, d_ff, bias=False)
        self.down_proj = torch.nn.Linear(d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(torch.nn.Module):
    def __init__(self, vocab, d, layers, heads, kv_heads, d_ff):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(Block(d, heads, kv_heads, d_ff) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head_dim = d // heads

    def forward(self, tokens):
        t = tokens.shape[1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(t).float(), inv)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
        sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x) @ self.embed_tokens.weight.T  # tied output


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, *rest = SHAPES[args.shape]
    model = Llama(vocab, *rest)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    data = torch.randint(0, vocab, (args.batch, args.seq + 1))
    inputs, targets = data[:, :-1], data[:, 1:].reshape(-1)

    def step():
        logits = model(inputs).reshape(-1, vocab)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    print(json.dumps({
        "system": f"pytorch {torch.__version__} eager f32, {args.threads} threads",
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "seconds_per_step": seconds,
        "tokens_per_s": args.batch * args.seq / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
