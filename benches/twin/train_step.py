#!/usr/bin/env python3
"""PyTorch twin of `chorus bench-step`: the same llama (RMSNorm, RoPE θ 1e4, grouped-query
attention, SwiGLU, tied embeddings, no biases), the same shapes, random tokens, cross-entropy over
every position, AdamW (lr 1e-4, weight decay 0.1); two warm-up steps, then `--steps` timed steps.
Prints one JSON line like chorus's.

With `--joint cached|live` the step is the joint model's ELBO instead (chorus-model's
`Chorus::forward_elbo` with the default `ChorusConfig`): a base and two frozen assistants of the
shape; an unconditioned base pass gives q(z|x,c) (mean-pooled hidden states → linear → μ, log σ²)
and p(z|c) (the context's pooled states → linear); one z = μ + σ ε per row; each model reads z
through its adapter (one memory slot per layer, read by a parallel attention branch, and an
embedding offset); the selector's log π over the conditioned base's hidden states; the exact
mixture log-likelihood logsumexp_j(log π_j + log P_j) over the text's tokens; loss
mean(−log p(x|z,c) + KL(q‖p)). `cached`: the assistants' log-probs are given (Co-LLM's scoring
step) and they have no adapters; `live`: they run, conditioned on z. Context: the first quarter of
each row.

usage: train_step.py --shape small|smollm2 [--batch 8] [--seq 128] [--steps 5] [--threads 2]
                     [--joint cached|live] [--device cpu|cuda] [--dtype f32|tf32|bf16]
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

    def forward(self, x, cos, sin, memory=None):
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
        if memory is not None:
            # memory slots: a parallel attention branch with its own softmax (chorus-lm attention.rs)
            mk, mv = (m.view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
                      .repeat_interleave(group, dim=1) for m in memory)
            a = a + F.scaled_dot_product_attention(q, mk, mv)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(torch.nn.Module):
    def __init__(self, vocab, d, layers, heads, kv_heads, d_ff, theta=10000.0):
        super().__init__()
        self.theta = theta
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(Block(d, heads, kv_heads, d_ff) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head_dim = d // heads

    def forward(self, tokens, offset=None, memory=None):
        """Logits; with `hidden=True` in `forward_hidden`, also the final hidden states."""
        return self.forward_hidden(tokens, offset, memory)[1]

    def forward_hidden(self, tokens, offset=None, memory=None):
        t = tokens.shape[1]
        dev = tokens.device
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=dev).float() / self.head_dim))
        angles = torch.outer(torch.arange(t, device=dev).float(), inv)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(self.norm.weight.dtype)
        sin = torch.cat((angles.sin(), angles.sin()), dim=-1).to(self.norm.weight.dtype)
        x = self.embed_tokens(tokens)
        if offset is not None:
            x = x + offset[:, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if memory is None else (memory[0][i], memory[1][i]))
        h = self.norm(x)
        return h, h @ self.embed_tokens.weight.T  # tied output


class ZAdapter(torch.nn.Module):
    """One memory slot per layer (keys and values from z) and an embedding offset."""

    def __init__(self, d_latent, d, layers, kv_dim):
        super().__init__()
        self.layers, self.kv_dim = layers, kv_dim
        self.memory_key = torch.nn.Linear(d_latent, layers * kv_dim, bias=False)
        self.memory_value = torch.nn.Linear(d_latent, layers * kv_dim, bias=False)
        self.embedding = torch.nn.Linear(d_latent, d, bias=False)

    def forward(self, z):
        b = z.shape[0]
        split = lambda t: t.view(b, 1, self.layers, self.kv_dim).unbind(2)  # per layer [b, 1, kv]
        return self.embedding(z), (split(self.memory_key(z)), split(self.memory_value(z)))


def masked_mean(h, mask):
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


class Joint(torch.nn.Module):
    def __init__(self, shape, live, d_latent=32):
        super().__init__()
        vocab, d, layers, heads, kv_heads, d_ff = shape
        kv_dim = kv_heads * (d // heads)
        self.base = Llama(*shape)
        self.assistants = torch.nn.ModuleList(Llama(*shape) for _ in range(2))
        self.assistants.requires_grad_(False)
        self.base_adapter = ZAdapter(d_latent, d, layers, kv_dim)
        self.assistant_adapters = torch.nn.ModuleList(
            ZAdapter(d_latent, d, layers, kv_dim) for _ in range(2 if live else 0))
        self.posterior = torch.nn.Linear(d, 2 * d_latent)
        self.prior = torch.nn.Linear(d, 2 * d_latent)
        self.selector = torch.nn.Linear(d, 3)
        self.d_latent = d_latent

    def loss(self, tokens, targets, context, text, cached):
        def token_log_probs(logits):
            return logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]

        h0, _ = self.base.forward_hidden(tokens)  # unconditioned pass (logits computed, as in chorus)
        ones = torch.ones_like(context)
        q = self.posterior(masked_mean(h0, ones)).float()
        p = self.prior(masked_mean(h0, context)).float()
        (mq, lq), (mp, lp) = q.chunk(2, -1), p.chunk(2, -1)
        z = mq + (0.5 * lq).exp() * torch.randn_like(mq)
        kl = 0.5 * ((lq - lp).exp() + (mq - mp).pow(2) * (-lp).exp() - 1.0 + lp - lq)
        zc = z.to(h0.dtype)
        offset, memory = self.base_adapter(zc)
        h, logits = self.base.forward_hidden(tokens, offset, memory)
        log_p = [token_log_probs(logits)]
        if cached is not None:
            log_p += list(cached.unbind(-1))
        else:
            for lm, adapter in zip(self.assistants, self.assistant_adapters):
                offset, memory = adapter(zc)
                log_p.append(token_log_probs(lm(tokens, offset, memory)))
        log_pi = self.selector(h).float().log_softmax(-1)
        ll = (torch.logsumexp(log_pi + torch.stack(log_p, -1), -1) * text).sum(1)
        return (-ll + kl.sum(1)).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--joint", choices=["cached", "live"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "tf32", "bf16"], default="f32",
                    help="tf32: f32 weights, TF32 matmuls (CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"
    vocab, *rest = SHAPES[args.shape]
    b, t = args.batch, args.seq
    data = torch.randint(0, vocab, (b, t + 1), device=dev)
    inputs, targets = data[:, :-1], data[:, 1:]
    if args.joint:
        model = Joint(SHAPES[args.shape], live=args.joint == "live").to(dev, dtype)
        position = torch.arange(t, device=dev)[None, :].expand(b, t)
        context = (position < t // 4).float()
        text = (position >= t // 4 - 1).float()
        cached = (torch.rand(b, t, 2, device=dev) * -10.0) if args.joint == "cached" else None
        loss_fn = lambda: model.loss(inputs, targets, context, text, cached)
    else:
        model = Llama(vocab, *rest).to(dev, dtype)
        loss_fn = lambda: F.cross_entropy(model(inputs).reshape(-1, vocab).float(), targets.reshape(-1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.1)

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    step()  # warm-up: two steps, as chorus (AdamW's first has no moments yet)
    step().item()  # reading the loss waits for the device
    warm_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    where = f"{args.threads} threads" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(json.dumps({
        "system": f"pytorch {torch.__version__} eager {args.dtype}, {where}",
        "joint": args.joint,
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warm_up_s": warm_up,
        "seconds_per_step": seconds,
        "tokens_per_s": args.batch * args.seq / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
