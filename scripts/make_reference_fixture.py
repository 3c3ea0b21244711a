#!/usr/bin/env python3
"""Cuts a full reference (llama_cpp_reference.py / numpy_reference.py output: every logit of a
49,152-token vocabulary per prompt) down to a fixture small enough to commit: per prompt its token
ids, the `--top` largest logits as (id, value) and the first `--greedy` greedy tokens; the tokenizer
cases as they are; no timing.

usage: make_reference_fixture.py FULL.json FIXTURE.json [--top 20] [--greedy 8]
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("full")
    ap.add_argument("fixture")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--greedy", type=int, default=8)
    ap.add_argument("--source", help="what produced FULL.json (kept in the fixture)")
    args = ap.parse_args()
    with open(args.full) as f:
        full = json.load(f)
    prompts = []
    for p in full["prompts"]:
        logits = p["logits"]
        order = sorted(range(len(logits)), key=lambda i: -logits[i])[: args.top]
        prompts.append(
            {
                "text": p["text"],
                "tokens": p["tokens"],
                "top": [[i, round(float(logits[i]), 6)] for i in order],
                "greedy": p["greedy"][: args.greedy],
            }
        )
    fixture = {
        "source": args.source or full.get("source", args.full),
        "logit_tolerance": full["logit_tolerance"],
        "prompts": prompts,
        "tokenizer": full["tokenizer"],
    }
    with open(args.fixture, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
