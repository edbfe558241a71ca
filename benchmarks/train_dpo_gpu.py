"""DPO step throughput on one GPU (issue 27): Kiln's training stage for ``method: dpo`` beside
Unsloth + TRL's DPOTrainer and plain TRL's DPOTrainer, each at its best, in one run.

    python3 benchmarks/train_dpo_gpu.py all --out DIR

Model: Qwen2.5-0.5B shape, random weights (speed does not depend on them; benchmarks/train_gpu.py
makes it), the SmolLM2 tokenizer. Data: 512 pairs of text made of whole words of the vocabulary
(prompt ~384 tokens, each answer ~128), tokenized by each trainer itself through the chat template
(Kiln in its tokenize function, TRL in its DPOTrainer: tests/test_dpo.py holds them to the same ids).
Every run starts from the same zero-initialised LoRA adapter (r 16, alpha 16, q,k,v,o,gate,up,down;
NF4 + double quant, bf16 compute), the reference being that adapter (Kiln and TRL) or the adapters
disabled (Unsloth's patched trainer, the same function at step 0). Effective batch 8 pairs; each
stack swept over micro-batch 2, 4, 8 (accumulation to 8) and gradient checkpointing off / on (its
own kind: Unsloth's "unsloth", HF's non-reentrant). Tokens/s = the pair sequences' tokens (prompt +
chosen and prompt + rejected) per second over 6 timed optimizer steps after 2 warm-up steps; peak =
max allocated. Each run in its own process (Unsloth patches TRL process-wide).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "scripts")]
WORK = Path(os.environ.get("KILN_BENCH_WORK", "/tmp/kiln-train-gpu"))
SHAPE, PAIRS, PROMPT_WORDS, ANSWER_WORDS = "qwen2.5-0.5b", 512, 384, 128
WARMUP, TIMED, EFFECTIVE = 2, 6, 8
SWEEP = [(bs, ck) for ck in (False, True) for bs in (2, 4, 8)]


def emit(out: str, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(Path(out) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def base_dir() -> Path:
    return WORK / "models" / SHAPE


def cmd_prepare(args) -> None:
    """The model (train_gpu.py's maker), the pairs as records, the zero-initialised SFT adapter."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from train_gpu import TARGETS, cmd_make
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cmd_make(argparse.Namespace(shape=[SHAPE]))
    tok = AutoTokenizer.from_pretrained(str(base_dir()))
    words = sorted({t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3})
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    rows = [
        {
            "prompt": [{"role": "user", "content": text(PROMPT_WORDS)}],
            "chosen": [{"role": "assistant", "content": text(ANSWER_WORDS)}],
            "rejected": [{"role": "assistant", "content": text(ANSWER_WORDS)}],
        }
        for _ in range(PAIRS)
    ]
    (WORK / "pairs.json").write_text(json.dumps(rows))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir()), dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(str(WORK / "sft-adapter"))
    print("prepared", len(rows), "pairs", flush=True)


def _step_times():
    """A TrainerCallback that keeps each optimizer step's end time (after a device sync)."""
    import torch
    from transformers import TrainerCallback

    class Times(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return Times()


def _record(args, stack: str, times: list[float], tokens_per_step: int, extra: dict | None = None) -> None:
    import torch

    timed = times[WARMUP : WARMUP + TIMED + 1]
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    emit(
        args.out,
        {
            "kind": "dpo",
            "stack": stack,
            "micro_batch": args.bs,
            "checkpointing": args.ckpt,
            "tokens_per_s": tokens_per_step / per_step,
            "step_s": per_step,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "card": torch.cuda.get_device_name(0),
            **(extra or {}),
        },
    )


def _tokens_per_step(pairs) -> int:
    """Tokens of the first EFFECTIVE pairs' two sequences (every step sees as many, lengths alike)."""
    per_pair = [
        2 * len(p) + len(c) + len(r) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])
    ]
    return round(sum(per_pair) / len(per_pair) * EFFECTIVE)


def cmd_kiln(args) -> None:
    """Kiln's stage: kiln.pref_train.train_preference, what the train rule runs for method dpo."""
    import datasets
    from transformers import AutoTokenizer

    from kiln.config import training_settings
    from kiln.pair_tokens import tokenize_pairs
    from kiln.pref_train import train_preference
    from kiln.records import to_canonical
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import TrainingPaths

    tok = AutoTokenizer.from_pretrained(str(base_dir()))
    rows = json.loads((WORK / "pairs.json").read_text())
    ds = datasets.Dataset.from_list(
        [{"kiln_id": str(i), "kind": "preference", "messages": to_canonical(r)[2]} for i, r in enumerate(rows)]
    )
    train, _ = tokenize_pairs(ds, tok, 1024)
    folder = WORK / f"kiln-{args.bs}-{args.ckpt}"
    tokenized = folder / "tokenized"
    datasets.DatasetDict(
        {"train": train, "validation": train.select(range(0)), "test": train.select(range(0))}
    ).save_to_disk(str(tokenized))
    settings = {
        **training_settings(),
        "method": "dpo",
        "from_experiment": "sft",
        "max_steps": WARMUP + TIMED + 1,
        "per_device_batch_size": args.bs,
        "gradient_accumulation_steps": EFFECTIVE // args.bs,
        "gradient_checkpointing": args.ckpt,
        "lora_r": 16,
        "lora_alpha": 16,
        "save_steps": 1000,
        "learning_rate": 5e-5,
        "warmup_ratio": 0.0,
    }
    paths = TrainingPaths(
        str(tokenized), str(base_dir()), str(folder / "adapter"), str(folder / "log.jsonl"), str(folder / "l.png"),
        str(folder / "summary.json"), str(folder / "ckpt"), start_adapter=str(WORK / "sft-adapter"),
    )  # fmt: skip
    summary = train_preference(
        paths, settings=TrainingSettings.from_dict(settings), tokenize=TokenizeSettings(max_seq_len=1024),
        data_fingerprints={}, experiment="bench",
    )  # fmt: skip
    steps = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    times = [r["time"] for r in steps if "loss" in r and "time" in r]
    _record(
        args,
        "kiln",
        times,
        _tokens_per_step(train),
        {"backend": summary["backend"], "log_prob_kernel": summary["preference"]["log_prob_kernel"]},
    )


def cmd_peer(args) -> None:
    """TRL's DPOTrainer as its users run it: on Unsloth's model with its patch, or on transformers + PEFT."""
    import datasets
    import torch
    from train_gpu import TARGETS

    if args.stack == "unsloth-trl":
        from unsloth import FastLanguageModel, PatchDPOTrainer

        PatchDPOTrainer()
        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(base_dir()), max_seq_length=1024, load_in_4bit=True
        )
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, target_modules=TARGETS,
            use_gradient_checkpointing="unsloth" if args.ckpt else False, random_state=0,
        )  # fmt: skip
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kiln.backends import bnb_config

        q = bnb_config(torch.bfloat16)  # NF4 + double quant, bf16 compute: what Kiln's stage loads
        base = AutoModelForCausalLM.from_pretrained(
            str(base_dir()), dtype=torch.bfloat16, quantization_config=q, device_map={"": 0}
        )
        model = PeftModel.from_pretrained(base, str(WORK / "sft-adapter"), is_trainable=True)
        tok = AutoTokenizer.from_pretrained(str(base_dir()))
    from trl import DPOConfig, DPOTrainer

    rows = json.loads((WORK / "pairs.json").read_text())
    config = DPOConfig(
        output_dir=str(WORK / f"{args.stack}-{args.bs}-{args.ckpt}"), max_steps=WARMUP + TIMED + 1,
        per_device_train_batch_size=args.bs, gradient_accumulation_steps=EFFECTIVE // args.bs,
        gradient_checkpointing=args.ckpt and args.stack != "unsloth-trl", bf16=True, learning_rate=5e-5,
        max_length=1024, logging_steps=1, save_strategy="no", report_to=[], beta=0.1,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.ckpt else None,
    )  # fmt: skip
    times = _step_times()
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[times],
    )
    trainer.train()
    _record(args, args.stack, times.times, _tokens_per_step(trainer.train_dataset[:64]))


def cmd_all(args) -> None:
    """Each stack over the sweep (or --settings), one process per run; past --budget seconds no new run
    starts (a device call has 10 minutes): the runs not made are recorded as skipped, never guessed."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    me, start = [sys.executable, __file__], time.monotonic()
    if not (WORK / "sft-adapter").exists():
        subprocess.run([*me, "prepare", "--out", args.out], check=True)
    sweep = SWEEP
    if args.settings:
        sweep = [(int(bs), ck == "1") for bs, ck in (x.split(":") for x in args.settings.split(","))]
    # Setting by setting, each stack in turn: a call cut short by its budget still compares like with like.
    for bs, ck in sweep:
        for stack in args.stacks.split(","):
            where = {"stack": stack, "micro_batch": bs, "checkpointing": ck}
            if time.monotonic() - start > args.budget:
                emit(args.out, {"kind": "skipped", **where, "why": f"past the call's budget of {args.budget} s"})
                continue
            cmd = [*me, "kiln" if stack == "kiln" else "peer", "--out", args.out, "--stack", stack, "--bs", str(bs)]
            t0 = time.monotonic()
            proc = subprocess.run(cmd + (["--ckpt"] if ck else []), capture_output=True, text=True)
            print(f"{stack} bs {bs} ckpt {ck}: rc {proc.returncode}, {time.monotonic() - t0:.0f} s", flush=True)
            if proc.returncode:
                tail = (proc.stderr or proc.stdout)[-1500:]
                emit(args.out, {"kind": "failed", **where, "error": tail})
    cmd_table(args)


def cmd_table(args) -> None:
    rows = [json.loads(line) for line in (Path(args.out) / "results.jsonl").read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "dpo"]
    best = {
        s: max((r for r in runs if r["stack"] == s), key=lambda r: r["tokens_per_s"])
        for s in {r["stack"] for r in runs}
    }
    lines = ["| stack | micro-batch | checkpointing | tokens/s | step s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["stack"], r["checkpointing"], r["micro_batch"])):
        mark = " (best)" if r is best[r["stack"]] else ""
        lines.append(
            f"| {r['stack']}{mark} | {r['micro_batch']} | {r['checkpointing']} | {r['tokens_per_s']:,.0f} "
            f"| {r['step_s']:.3f} | {r['peak_gib']:.1f} |"
        )
    if "kiln" in best:
        for s in sorted(best):
            if s != "kiln":
                lines.append(
                    f"\nKiln's stage at its best / {s} at its best: "
                    f"{best['kiln']['tokens_per_s'] / best[s]['tokens_per_s']:.2f}x"
                )
    (Path(args.out) / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "prepare", "kiln", "peer", "table"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--stack", default="kiln")
        p.add_argument("--bs", type=int, default=8)
        p.add_argument("--ckpt", action="store_true")
        p.add_argument("--stacks", default="kiln,unsloth-trl,hf-trl", help="all: the stacks swept, in order")
        p.add_argument("--settings", default="", help="all: micro-batch:checkpointing pairs, e.g. 8:0,4:1")
        p.add_argument("--budget", type=float, default=1e9, help="all: seconds after which no run starts")
    args = ap.parse_args()
    globals()[f"cmd_{args.cmd}"](args)


if __name__ == "__main__":
    main()
