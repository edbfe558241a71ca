"""Training throughput of Kiln's training stage vs a bare transformers + PEFT + bitsandbytes loop.

    python benchmarks/train_cpu.py --out benchmarks/results/train_cpu.json

Same base model, same tokenized rows in the same order, same batch size, NF4 + float32 compute,
LoRA r=16 on all linear layers, AdamW. Both count every input token of a padded batch. The first
``--warmup`` steps of each are excluded. Target (issue 3): Kiln tokens/s >= 0.95x the bare loop.
Needs a built default run (results/base/smollm2-135m and its tokenized dataset).
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

import torch
from data_stages import machine

from kiln.config import training_settings

# The defaults from kiln.spec, with what this benchmark pins (constant LR, no eval, no checkpoints).
SETTINGS = training_settings(
    {
        "backend": "hf",
        "compute_dtype": "float32",
        "learning_rate": 2e-4,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "eval_samples": 1,
        "save_steps": 10_000,
        "save_total_limit": 1,
        "seed": 0,
    }
)


def bare_loop(base: str, rows: list[list[int]], masks: list[list[int]], steps: int, warmup: int, pad: int):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from kiln.backends import bnb_config, lora_config

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=bnb_config(torch.float32), device_map={"": "cpu"}
    )
    model = get_peft_model(model, lora_config(SETTINGS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SETTINGS["learning_rate"])
    bs, tokens, t0 = SETTINGS["per_device_batch_size"], 0, None
    for step in range(steps):
        ids_b, mask_b = rows[step * bs : (step + 1) * bs], masks[step * bs : (step + 1) * bs]
        length = max(map(len, ids_b))
        ids = torch.full((bs, length), pad)
        labels = torch.full((bs, length), -100)
        attn = torch.zeros((bs, length), dtype=torch.long)
        for j, (x, m) in enumerate(zip(ids_b, mask_b, strict=True)):
            ids[j, : len(x)] = torch.tensor(x)
            attn[j, : len(x)] = 1
            labels[j, : len(x)] = torch.where(torch.tensor(m).bool(), torch.tensor(x), -100)
        if step == warmup:
            t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += ids.numel()
    return tokens / (time.perf_counter() - t0)


def kiln_stage(base: str, tokenized: str, steps: int, warmup: int, max_seq_len: int) -> float:
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import TrainingPaths, train

    tmp = Path(tempfile.mkdtemp(prefix="kiln-train-bench-"))
    train(
        TrainingPaths(
            tokenized,
            base,
            str(tmp / "adapter"),
            str(tmp / "steps.jsonl"),
            str(tmp / "loss.png"),
            str(tmp / "summary.json"),
            str(tmp / "ckpt"),
        ),
        TrainingSettings.from_dict({**SETTINGS, "max_steps": steps}),
        TokenizeSettings(max_seq_len=max_seq_len, assistant_only_loss=True, packing=False),
        {"bench": "x"},
        "bench",
        threads=torch.get_num_threads(),
    )
    log = [json.loads(x) for x in (tmp / "steps.jsonl").read_text().splitlines()]
    marks = [(r["time"], r["num_input_tokens_seen"]) for r in log if "loss" in r]
    (t_a, n_a), (t_b, n_b) = marks[warmup - 1], marks[-1]
    return (n_b - n_a) / (t_b - t_a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="results/base/smollm2-135m")
    ap.add_argument("--tokenized", default=None)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import datasets
    from transformers import AutoTokenizer

    tokenized = args.tokenized or sorted(glob.glob("results/data/orders/tokenized/smollm2-135m-*/"))[0]
    max_seq_len = json.loads(Path(tokenized.rstrip("/") + ".json").read_text())["max_seq_len"]
    train_split = datasets.load_from_disk(tokenized)["train"]
    # The Trainer shuffles with its seed: feed the bare loop the same rows in the same order.
    from transformers import set_seed

    set_seed(SETTINGS["seed"])
    order = list(torch.utils.data.RandomSampler(train_split, generator=torch.Generator().manual_seed(SETTINGS["seed"])))
    rows = [train_split[i]["input_ids"] for i in order]
    masks = [train_split[i]["assistant_masks"] for i in order]
    pad = AutoTokenizer.from_pretrained(args.base).pad_token_id
    bare = bare_loop(args.base, rows, masks, args.steps, args.warmup, pad)
    kiln = kiln_stage(args.base, tokenized, args.steps, args.warmup, max_seq_len)
    result = {
        "machine": machine(),
        "model": args.base,
        "batch": SETTINGS["per_device_batch_size"],
        "timed_steps": args.steps - args.warmup,
        "threads": torch.get_num_threads(),
        "bare_tokens_per_s": round(bare, 1),
        "kiln_tokens_per_s": round(kiln, 1),
        "ratio": round(kiln / bare, 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
