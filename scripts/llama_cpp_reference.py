#!/usr/bin/env python3
"""Reference numbers from llama.cpp (through llama-cpp-python) for `chorus check-reference`.

For 5 fixed prompts: llama.cpp's token ids, its full next-token logits after the prompt, and its
greedy continuation; for a set of tricky strings (unicode, digits, whitespace runs, the chat
template): its token ids; and its load time, prefill and decode tokens/s and peak memory.

usage: llama_cpp_reference.py MODEL.gguf OUT.json [--greedy 20] [--threads 2]
"""
import argparse
import json
import resource
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "In 1865, after four years of civil war, the United States",
]

TOKENIZER_CASES = [
    "Hello world",
    "naïve café, Zürich — “quotes” and ‘apostrophes’",
    "日本語のテキストと한국어",
    "emoji 🎉🚀 and ZWJ 👩‍💻",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand    runs     of spaces",
    "don't won't it's we'll they've I'm",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--greedy", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t0 = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=512, n_threads=args.threads, logits_all=True, verbose=False)
    load_s = time.perf_counter() - t0

    prompts = []
    prefill_tokens = prefill_s = decode_tokens = decode_s = 0.0
    # llama.cpp's own count of the decode's time, without this Python loop's: its perf counters,
    # reset before each prompt's decode (a one-token `eval` may count as a prompt eval).
    eval_tokens = eval_ms = 0.0
    for text in PROMPTS:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        prefill_s += time.perf_counter() - t0
        prefill_tokens += len(tokens)
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        greedy = [int(np.argmax(logits))]
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        while len(greedy) < args.greedy:
            llm.eval([greedy[-1]])
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        decode_s += time.perf_counter() - t0
        decode_tokens += len(greedy) - 1
        perf = llama_cpp.llama_perf_context(llm.ctx)
        eval_tokens += perf.n_eval + perf.n_p_eval
        eval_ms += perf.t_eval_ms + perf.t_p_eval_ms
        prompts.append({"text": text, "tokens": tokens, "logits": logits.tolist(), "greedy": greedy})

    cases = [
        {"text": s, "tokens": llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)} for s in TOKENIZER_CASES
    ]
    timing = {
        "load_s": load_s,
        "prefill_tokens_per_s": prefill_tokens / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "decode_eval_tokens_per_s": eval_tokens / (eval_ms / 1e3),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        # The widest vectors this llama.cpp build was compiled for.
        "vectors": "AVX-512" if "AVX512 = 1" in llama_cpp.llama_print_system_info().decode() else "AVX2",
    }
    with open(args.out, "w") as f:
        # llama.cpp multiplies its quantised blocks by activations rounded to 8 bits, so its logits
        # are off an exact f32 forward's by up to ≈ 0.9 on SmolLM2 (either build, docs/models.md):
        # the |Δlogit| `chorus check-reference` accepts by default.
        json.dump({"model": args.model, "logit_tolerance": 1.0, "prompts": prompts, "tokenizer": cases,
                   "timing": timing}, f)
    print(f"wrote {args.out}: {len(prompts)} prompts, {len(cases)} tokenizer strings, timing {timing}")


if __name__ == "__main__":
    main()
