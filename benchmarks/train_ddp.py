"""Data-parallel training: Kiln's training stage on 1 GPU and on N GPUs, in one run on one machine.

    python3 benchmarks/train_ddp.py --out DIR [--gpus 2] [--steps 14] [--warmup 4]
    python3 benchmarks/train_ddp.py --out DIR --curves RESULTS/EXP_1GPU RESULTS/EXP_NGPU

Both runs call what the `train` rule calls: ``kiln.train.train`` in this process for 1 GPU,
``kiln.launch.launch`` (``accelerate launch --multi_gpu``, DDP) for N. Same model, data, seed and
effective batch; the hf backend on both (Unsloth is one-GPU, so DDP runs the hf backend and the
comparison holds the backend fixed). Model: Qwen2.5-0.5B shape with random weights (speed does
not depend on them), seq 2048 random-token rows (no padding: every token counts), NF4 + double
quant, bf16 compute, LoRA r=16 on q,k,v,o,gate,up,down, effective batch 32 sequences, each
process's micro-batch sized to its card (auto_micro_batch), lean step, no gradient checkpointing.

Throughput: tokens of the optimizer steps after the warm-up / their wall time, from the main
process's step log (one line per step, written after the step's loss is read back). Loss curves
of the same runs are compared step by step; the loss-curve check on real rows (the default task)
runs through Snakemake with benchmarks/configs/ddp.yaml (benchmarks/ddp_e2e.sh).

Writes DIR/results.jsonl, DIR/table.md and each run's step log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import TOKENIZER, WORK, random_tokenized  # noqa: E402  (the same model shapes and data)


def settings(steps: int, batch: int) -> dict:
    from kiln.config import training_settings

    training = {
        "backend": "hf",
        "quantization": "nf4",
        "compute_dtype": "auto",
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "learning_rate": 2e-4,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_steps": steps,
        "per_device_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "auto_micro_batch": True,
        "step_metrics": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 1000,
        "seed": 42,
    }
    return training_settings(training)


def run(name: str, gpus: int, shape: str, tokenized: Path, cfg: dict, seq: int, warmup: int, out: Path) -> dict:
    from kiln.launch import launch
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import TrainingPaths, train

    work = WORK / "ddp" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    paths = TrainingPaths(
        tokenized_dir=str(tokenized),
        base_dir=str(WORK / "models" / shape),
        adapter_dir=str(work / "adapter"),
        step_log_out=str(work / "steps.jsonl"),
        loss_png=str(work / "loss.png"),
        summary_path=str(work / "summary.json"),
        ckpt_dir=str(work / "ckpt"),
    )
    spec = dict(
        paths=paths,
        settings=TrainingSettings.from_dict({**cfg, "num_gpus": gpus}),
        tokenize=TokenizeSettings(max_seq_len=seq, assistant_only_loss=True, packing=False),
        data_fingerprints={},
        experiment=name,
    )
    t0 = time.time()
    if gpus == 1:
        summary = train(**spec)
    else:  # allow_cpu: a plumbing check of this script on a machine without CUDA (gloo)
        summary = launch(spec, gpus, log_file=str(work / "train.log"), allow_cpu=True)
    wall = time.time() - t0
    steps = [json.loads(x) for x in (work / "steps.jsonl").read_text().splitlines()]
    shutil.copyfile(work / "steps.jsonl", out / f"{name}_steps.jsonl")
    (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=2))
    timed = [r for r in steps if "loss" in r and r["step"] >= warmup]
    seconds = timed[-1]["time"] - timed[0]["time"]
    n = timed[-1]["step"] - timed[0]["step"]
    tokens = n * summary["effective_batch"] * seq
    record = {
        "name": name,
        "gpus": gpus,
        "backend": summary["backend"],
        "micro_batch": summary["micro_batch"],
        "gradient_accumulation_steps": summary["gradient_accumulation_steps"],
        "effective_batch": summary["effective_batch"],
        "seq": seq,
        "timed_steps": n,
        "step_s": seconds / n,
        "tokens_per_s": tokens / seconds,
        "losses": [r["loss"] for r in steps if "loss" in r],
        "peak_gib_per_gpu": [
            round((p.get("gpu_max_allocated_mb") or 0) / 1024, 2)
            for p in (summary["peak_memory_per_process"] or [summary["peak_memory"]])
        ],
        "wall_s": round(wall, 1),
    }
    print("RESULT", json.dumps(record), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def curves(one: Path, many: Path, out: Path, train_tol: float = 0.02, eval_tol: float = 0.01) -> dict:
    """Two experiments' step logs (train_log.jsonl), compared at every logged step; a PNG of both.

    Pass: every train loss within ``train_tol`` and every validation loss within ``eval_tol``
    (relative). Both tolerances were fixed before the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(exp: Path) -> tuple[dict, dict, dict]:
        rows = [json.loads(x) for x in (exp / "train_log.jsonl").read_text().splitlines()]
        summary = json.loads((exp / "train_summary.json").read_text())
        train = {r["step"]: r["loss"] for r in rows if "loss" in r}
        evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
        return train, evals, summary

    (t1, e1, s1), (tn, en, sn) = read(one), read(many)
    if set(t1) != set(tn) or set(e1) != set(en):
        raise SystemExit(f"the runs logged different steps: {sorted(t1)} vs {sorted(tn)}")
    rel_t = {k: abs(tn[k] - t1[k]) / abs(t1[k]) for k in t1}
    rel_e = {k: abs(en[k] - e1[k]) / abs(e1[k]) for k in e1}
    verdict = {
        "name": "curves",
        "runs": [one.name, many.name],
        "processes": [s1.get("processes", 1), sn.get("processes", 1)],
        "micro_x_accum": [
            [s1["micro_batch"], s1["gradient_accumulation_steps"]],
            [sn["micro_batch"], sn["gradient_accumulation_steps"]],
        ],
        "effective_batch": [s1["effective_batch"], sn["effective_batch"]],
        "train_loss_first_last": [[t1[min(t1)], t1[max(t1)]], [tn[min(tn)], tn[max(tn)]]],
        "eval_loss": [[e1[k] for k in sorted(e1)], [en[k] for k in sorted(en)]],
        "train_max_rel_diff": max(rel_t.values()),
        "train_mean_rel_diff": sum(rel_t.values()) / len(rel_t),
        "eval_max_rel_diff": max(rel_e.values()) if rel_e else None,
        "tolerance": {"train": train_tol, "eval": eval_tol},
        "train_runtime_s": [s1["train_runtime_s"], sn["train_runtime_s"]],
    }
    verdict["pass"] = verdict["train_max_rel_diff"] <= train_tol and (not rel_e or max(rel_e.values()) <= eval_tol)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for (train, evals), label in (((t1, e1), one.name), ((tn, en), many.name)):
        ax.plot(sorted(train), [train[k] for k in sorted(train)], label=f"{label} train")
        ax.plot(sorted(evals), [evals[k] for k in sorted(evals)], "o--", label=f"{label} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"1 vs {sn.get('processes', 1)} GPUs: max rel. diff {verdict['train_max_rel_diff']:.2%}")
    fig.tight_layout()
    fig.savefig(out / "loss_curves_1_vs_n.png")
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(verdict) + "\n")
    print("CURVES", json.dumps(verdict), flush=True)
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="a shape of train_gpu.SHAPES ('tiny': CPU check)")
    ap.add_argument("--run", type=int, help="(internal) run only this many GPUs, in this process")
    ap.add_argument("--curves", nargs=2, type=Path, metavar=("EXP_1GPU", "EXP_NGPU"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.curves:
        raise SystemExit(0 if curves(*args.curves, args.out)["pass"] else 1)
    import torch

    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print("cards:", cards, flush=True)
    shape = args.shape
    if not (WORK / "models" / shape / "identity.json").exists():
        from train_gpu import SHAPES

        from kiln.base_model import prepare_base_model
        from kiln.experiment import ModelSpec

        entry = {"kind": "random", "seed": 0, "architecture": SHAPES[shape], "tokenizer_from": str(TOKENIZER)}
        spec = ModelSpec.from_config(shape, entry)
        prepare_base_model(spec, WORK / "models" / shape, tokenizer_dir=TOKENIZER, dtype="bfloat16")
    cfg = settings(args.steps, args.batch)
    tokenized = random_tokenized(shape, args.batch * (args.steps + 2), args.seq)
    if args.run:  # one configuration, in its own process (as each Snakemake job is)
        run(f"gpu{args.run}", args.run, shape, tokenized, cfg, args.seq, args.warmup, args.out)
        return
    # Each run in a fresh process: a finished in-process run would keep its GPU memory cached
    # (the allocator's) and squeeze the next run's micro-batch on that card.
    records = {}
    for gpus in (1, args.gpus):
        argv = [a for a in sys.argv[1:]]
        subprocess.run([sys.executable, __file__, *argv, "--run", str(gpus)], check=True)
        rows = [json.loads(x) for x in (args.out / "results.jsonl").read_text().splitlines()]
        records[gpus] = next(r for r in reversed(rows) if r.get("name") == f"gpu{gpus}")
    one, many = records[1], records[args.gpus]
    rel = [abs(a - b) / abs(a) for a, b in zip(one["losses"], many["losses"], strict=True)]
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    verdict = {
        "cards": cards,
        "speedup": speedup,
        "scaling_efficiency": speedup / args.gpus,
        "loss_max_rel_diff": max(rel),
        "loss_mean_rel_diff": sum(rel) / len(rel),
    }
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps({"name": "comparison", **verdict}) + "\n")
    lines = [
        f"Cards: {', '.join(cards) or 'none (CPU)'}. {shape} shape, random weights, NF4 + bf16, LoRA r=16 all-linear, "
        f"seq {args.seq}, effective batch {args.batch} sequences, hf backend, {args.warmup} warm-up steps "
        "excluded.",
        "",
        "| run | GPUs | micro x accum per GPU | step s | tokens/s | peak GiB per GPU |",
        "|---|---|---|---|---|---|",
    ]
    for r in (one, many):
        lines.append(
            f"| {r['name']} | {r['gpus']} | {r['micro_batch']} x {r['gradient_accumulation_steps']} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {', '.join(map(str, r['peak_gib_per_gpu']))} |"
        )
    lines += [
        "",
        f"Throughput {args.gpus} GPUs / 1 GPU: {speedup:.2f}x (scaling efficiency {speedup / args.gpus:.0%}).",
        f"Loss, step by step: max relative difference {max(rel):.2e}, mean {sum(rel) / len(rel):.2e}.",
    ]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
