"""Evaluation generation: batched greedy generation vs one prompt at a time, same prompts and model.

    python benchmarks/eval_generation.py --out benchmarks/results/eval_generation.json

Target (issue 3): batched >= 4x faster. Also reports how many outputs agree exactly (left padding
can change the last bits of a logit, rarely the argmax). Needs a built default run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from data_stages import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="results/default/merged")
    ap.add_argument("--dataset", default="results/data/orders/dataset")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.passes import generate
    from kiln.prompts import prompts_and_references

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    test = datasets.load_from_disk(args.dataset)["test"]
    prompts, _, _ = prompts_and_references(test, tok, args.prompts)
    generate(model, tok, prompts[:2], 2, 4)  # warm-up
    t = time.perf_counter()
    batched = generate(model, tok, prompts, args.batch_size, args.max_new_tokens)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = generate(model, tok, prompts, 1, args.max_new_tokens)
    t_single = time.perf_counter() - t
    result = {
        "machine": machine(),
        "model": args.model,
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "batched_s": round(t_batched, 2),
        "one_at_a_time_s": round(t_single, 2),
        "speedup": round(t_single / t_batched, 2),
        "identical_outputs": sum(a == b for a, b in zip(batched, single, strict=True)) / len(prompts),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
