"""GPU training throughput: plain loops beside Kiln's training stage, on one card, in one run.

    python3 benchmarks/train_gpu.py all --out DIR [--part 1|2|all]

Runs, each in its own process (Unsloth patches transformers process-wide), on a model of
Qwen2.5-0.5B shape with random weights (speed does not depend on the weights), seq 2048, random
tokens:
  (1) a plain Hugging Face + PEFT + bitsandbytes QLoRA loop, batch 8;
  (2) a plain Unsloth QLoRA loop, batch 8;
  (3) Kiln's training stage (kiln.train.train, the function the `train` rule calls) with the
      settings of benchmarks/configs/train_gpu.yaml;
plus the lever runs (the stage with one setting changed at a time) and, on the default task's real
(short, varied) rows tokenized by Kiln at SmolLM2-135M shape, the stage with and without packing
(effective, non-pad tokens/s). Prints tokens/s, peak GiB and the 6N-FLOP utilisation (against an
8192^3 bf16 matmul measured in the same run) for each, and writes DIR/results.jsonl + DIR/table.md.

Method: a fresh random batch each step; warm-up steps excluded; the clock stops after a device
synchronize. QLoRA everywhere: NF4 + double quant, bf16 compute, LoRA r=16 alpha=16 on q,k,v,o,
gate,up,down. Worker subcommands: matmul, make, loop, sft, kiln, table.

Parts p1 (SmolLM2-135M shape) and p3 (Qwen2.5-0.5B shape) race packed training that keeps documents
apart (Kiln's collator and a varlen kernel: each Kiln record carries `attention`) against Kiln
unpacked and Unsloth + TRL's SFTTrainer with its own packing, swept; p2 compares validation loss
packed vs unpacked after the same rows seen.
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
sys.path.insert(0, str(REPO / "scripts"))  # kiln, as the rules' scripts import it
WORK = Path(os.environ.get("KILN_BENCH_WORK", "/tmp/kiln-train-gpu"))
TOKENIZER = REPO / "tests" / "fixtures" / "smollm2-tokenizer"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
    },
    "tiny": {  # CPU plumbing checks only
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
    },
}


SHAPES["qwen2.5-1.5b"] = {
    **SHAPES["qwen2.5-0.5b"],
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
}


# issue 28's third shape: Llama-3-8B (no q/k/v biases: Unsloth fuses its LoRA projections itself)
SHAPES["llama-3-8b"] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def emit(out: Path, record: dict) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print("RESULT", json.dumps(record), flush=True)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---- workers ------------------------------------------------------------------------------------
def cmd_matmul(args) -> None:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    emit(args.out, {"kind": "matmul", "card": card(), "tflops": 2 * n**3 / med / 1e12})


def cmd_make(args) -> None:
    """A random-weight model of a real shape, saved the way Kiln's base_model rule saves one."""
    from kiln.base_model import prepare_base_model
    from kiln.experiment import ModelSpec

    for shape in args.shape:
        out = WORK / "models" / shape
        if (out / "identity.json").exists():
            continue
        cfg = {"kind": "random", "seed": 0, "architecture": SHAPES[shape], "tokenizer_from": str(TOKENIZER)}
        prepare_base_model(ModelSpec.from_config(shape, cfg), out, tokenizer_dir=TOKENIZER, dtype="bfloat16")
        print("made", shape, flush=True)


def n_params(shape: str) -> int:
    return json.loads((WORK / "models" / shape / "identity.json").read_text())["parameters"]


def unsloth_lora(path: str, seq: int, checkpointing: bool):
    """Unsloth's 4-bit model with the benchmark's LoRA, as its users make one: (model, tokenizer)."""
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=seq, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        target_modules=TARGETS,
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        random_state=0,
    )
    return model, tok


def cmd_loop(args) -> None:
    """A plain QLoRA training loop (no Trainer), the way its users write one, at each micro-batch of
    ``--bs`` in turn (one model load; ascending; the first out-of-memory ends the sweep and is
    recorded), with gradient checkpointing on or off (``--ckpt``)."""
    t_start = time.time()
    if args.lever == "expandable_segments":  # the allocator setting, before torch allocates anything
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if args.backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    import bitsandbytes as bnb
    import torch

    path = str(WORK / "models" / args.shape)
    dev = "cuda" if cuda() else "cpu"
    ckpt = args.ckpt == "on"
    if args.backend == "hf":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0 if dev == "cuda" else "cpu"}
        )
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    else:
        from unsloth import FastLanguageModel

        model, _ = unsloth_lora(path, args.seq, ckpt)
        FastLanguageModel.for_training(model)
    fused = None
    if args.lever == "kiln_fused":  # issue 28: kiln.fused_lora on the same Unsloth model
        from kiln.fused_lora import install

        fused = install(model)
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    forward_loss = lever_loss(model, args.lever, args.backend)
    for bs in args.bs:
        opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        g = torch.Generator().manual_seed(0)
        data = torch.randint(3, vocab, (args.warmup + args.steps + 3 * args.profile, bs, args.seq), generator=g)

        def step(i, data=data, opt=opt):
            x = data[i].to(dev, non_blocking=True)
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = forward_loss(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        record = {
            "kind": "train",
            "name": f"{args.name}_bs{bs}",
            "runner": f"plain {args.backend} loop" + (f" + {args.lever}" if args.lever != "none" else ""),
            "lever": args.lever,
            "shape": args.shape,
            "seq": args.seq,
            "micro_batch": bs,
            "effective_batch": bs,
            "checkpointing": ckpt,
            "n_params": n_params(args.shape),
            "card": card(),
            "fused": fused,
        }
        try:
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.warmup):
                step(i).item()
            sync()
            t0 = time.perf_counter()
            losses = [step(args.warmup + i).detach() for i in range(args.steps)]
            sync()
            dt = time.perf_counter() - t0
            if args.profile:
                where = args.out / f"profile_{args.name}_bs{bs}.txt"
                record["profile"] = profile_steps(step, args.warmup + args.steps, where, dt / args.steps)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            del opt, data
            torch.cuda.empty_cache()
            emit(args.out, {**record, "oom": True, "tokens_per_s": None, "wall_s": time.time() - t_start})
            break
        emit(
            args.out,
            {
                **record,
                "tokens_per_s": bs * args.seq * args.steps / dt,
                "step_s": dt / args.steps,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
                "loss_last": losses[-1].item(),
                "losses": [float(x) for x in losses],  # same seed and data: runs compare step by step
                "wall_s": time.time() - t_start,
            },
        )
        del opt, data
        if dev == "cuda":
            torch.cuda.empty_cache()


def lever_loss(model, lever: str, backend: str):
    """The step's forward + loss for a lever measured on the plain loop (issue 16 item 2):
    ``none`` is the model's own loss (Unsloth's chunked, fused LM head + cross-entropy on that
    backend); ``liger_flce`` takes the last hidden states from Unsloth and computes the LM head and
    cross-entropy with Liger's fused linear cross-entropy (chunked, gradients in the forward, the
    151,936-wide logits never whole); ``expandable_segments`` only changes the CUDA allocator."""
    if lever != "liger_flce":
        return lambda x: model(input_ids=x, labels=x).loss
    if backend != "unsloth":
        raise SystemExit("--lever liger_flce is measured on the Unsloth loop")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] = "1"  # read by Unsloth's forward at each call
    flce = LigerFusedLinearCrossEntropyLoss()
    head = model.get_output_embeddings().weight

    def forward_loss(x):
        hidden = model(input_ids=x).logits  # the final-norm hidden states, under this variable
        h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
        return flce(head.to(h.dtype), h, x[:, 1:].reshape(-1))

    return forward_loss


def profile_steps(step, first: int, path: Path, step_s: float, n: int = 3) -> dict:
    """Where a step's GPU time goes: ``n`` more steps under torch.profiler, kernels grouped by kind
    (matmul, attention, bitsandbytes dequantisation, the loss, Triton kernels, other); the whole
    table to ``path``. The busy fraction is the kernel time of a step over the un-profiled step's
    time (``step_s``): the profiler's own host work slows the profiled steps' wall clock (0.63 s vs
    0.46 s a step on the H200), so kernel time over profiled wall time understates it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(first + i).item()
        sync()
    wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    groups = {
        "matmul": ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm100_"),
        "attention": ("flash", "fmha", "attention", "sdpa", "efficient"),
        "bnb_dequant": ("dequant", "kdequantize", "4bit"),
        "loss": ("cross_entropy", "logsumexp", "log_softmax", "nll"),
        "triton_other": ("triton_", "_kernel"),
    }
    total, by = 0.0, dict.fromkeys([*groups, "other"], 0.0)
    for e in events:
        us = e.self_device_time_total
        total += us
        name = e.key.lower()
        kind = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other")
        by[kind] += us
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60))
    return {
        "steps": n,
        "wall_s": wall,
        "kernel_s": total / 1e6,
        "busy_fraction_of_profiled_wall": total / 1e6 / wall,
        "busy_fraction": total / 1e6 / n / step_s,
        "share": {k: round(v / total, 4) for k, v in by.items()} if total else {},
    }


def cmd_sft(args) -> None:
    """Unsloth through TRL's SFTTrainer, as its users run it (Unsloth's notebooks): FastLanguageModel,
    its LoRA, SFTTrainer with adamw_8bit, bf16, gradient checkpointing "unsloth" unless ``--ckpt
    off``; each ``--bs`` x ``--accum`` in turn; tokens/s over the steps after the warm-up, from a
    callback that synchronizes the device."""
    t_start = time.time()
    import torch
    import unsloth  # noqa: F401
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tok = unsloth_lora(str(WORK / "models" / args.shape), args.seq, args.ckpt == "on")
    ckpt = args.ckpt == "on"
    import datasets

    if args.data == "random":
        data = random_tokenized(args.shape, 64 * (args.warmup + args.steps + 2), args.seq)
        train = datasets.load_from_disk(str(data))["train"].remove_columns(["assistant_masks"])
    else:  # the default task's conversations, tokenized (and packed) by TRL itself, as its users run it
        orders_tokenized(args.rows, False, args.seq)
        train = datasets.load_from_disk(str(WORK / "data" / f"orders-{args.rows}" / "dataset"))["train"]
        train = train.select_columns(["messages"])

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.epoch = {}, {}

        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                sync()
                self.t[state.global_step] = time.perf_counter()
                self.epoch[state.global_step] = state.epoch

    for bs, accum in zip(args.bs, args.accum, strict=True):
        clock = Clock()
        cfg = SFTConfig(
            output_dir=str(WORK / "sft" / f"{args.name}-{bs}x{accum}"),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            max_steps=args.warmup + args.steps,
            learning_rate=2e-4,
            optim="adamw_8bit",
            bf16=True,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            max_length=args.seq,
            packing=args.packing,
            dataset_num_proc=1,
        )
        record = {
            "kind": "train",
            "name": f"{args.name}_bs{bs}x{accum}",
            "runner": "unsloth + TRL SFTTrainer",
            "documented_default": args.default,
            "shape": args.shape,
            "seq": args.seq,
            "micro_batch": bs,
            "effective_batch": bs * accum,
            "checkpointing": ckpt,
            "n_params": n_params(args.shape),
            "card": card(),
            "data": args.data,
            "packing": args.packing,
        }
        try:
            torch.cuda.reset_peak_memory_stats()
            trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=train, args=cfg, callbacks=[clock])
            trainer.train()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            emit(args.out, {**record, "oom": True, "tokens_per_s": None, "wall_s": time.time() - t_start})
            break
        dt = clock.t[args.warmup + args.steps] - clock.t[args.warmup]
        if args.data == "random":
            tokens = bs * accum * args.seq * args.steps
        else:  # real rows: the non-pad tokens of the rows seen in the window (TRL's own tokenization)
            import pyarrow.compute as pc

            col = trainer.train_dataset.data.column("input_ids")
            total = int(pc.sum(pc.list_value_length(col)).as_py())
            tokens = (clock.epoch[args.warmup + args.steps] - clock.epoch[args.warmup]) * total
            record["train_tokens_total"] = total
        emit(
            args.out,
            {
                **record,
                "tokens_per_s": tokens / dt,
                "step_s": dt / args.steps,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "wall_s": time.time() - t_start,
            },
        )
        del trainer
        torch.cuda.empty_cache()


def random_tokenized(shape: str, rows: int, seq: int) -> Path:
    """A tokenized DatasetDict of full-length random rows, as the tokenize rule would save it."""
    import datasets
    import numpy as np

    out = WORK / "data" / f"random-{shape}-{rows}x{seq}"
    if out.exists():
        return out
    vocab = SHAPES[shape]["vocab_size"]
    rng = np.random.default_rng(0)

    def split(n):
        ids = rng.integers(3, vocab, size=(n, seq), dtype=np.int64).tolist()
        return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": [[1] * seq] * n})

    datasets.DatasetDict({"train": split(rows), "validation": split(8), "test": split(8)}).save_to_disk(str(out))
    return out


def orders_tokenized(rows: int, packing: bool, seq: int) -> Path:
    """The default task's rows through Kiln's own data stages (synthetic -> clean -> build -> tokenize)."""
    import pyarrow.parquet as pq  # noqa: F401

    from kiln.clean import clean_shard
    from kiln.dataset import build_dataset
    from kiln.sources import canonical_rows, write_raw
    from kiln.spec import BuildSettings, CleanSettings, TokenizeSettings
    from kiln.synthetic import ANSWER_SCHEMA, generate
    from kiln.tokenize import tokenize_dataset

    base = WORK / "data" / f"orders-{rows}"
    out = WORK / "data" / f"orders-{rows}-{'packed' if packing else 'unpacked'}-{seq}"
    if out.exists():
        return out
    if not (base / "dataset").exists():
        base.mkdir(parents=True, exist_ok=True)
        records = generate(rows, seed=1234, mess_rate=0.12)
        items = ((i, r, json.dumps(r), None) for i, r in enumerate(records, 1))
        write_raw(canonical_rows(items, source="synthetic", file="bench", fmt="auto", columns={}), base / "raw.parquet")
        clean = {"min_chars": 10, "max_chars": 4000, "answer_schema": ANSWER_SCHEMA}
        clean_shard(
            base / "raw.parquet",
            base / "clean.parquet",
            base / "rej.parquet",
            base / "clean.json",
            CleanSettings.from_dict(clean),
        )
        # speed runs: no audit (and no datasketch on the GPU image)
        build = BuildSettings(validation=0.02, test=0.02, contamination_audit=False)
        build_dataset([str(base / "clean.parquet")], base / "dataset", base / "brej.parquet", base / "b.json", build)
    settings = {"max_seq_len": seq, "assistant_only_loss": True, "packing": packing}
    tokenize_dataset(
        base / "dataset",
        WORK / "models" / "smollm2-135m",
        out,
        str(out) + ".json",
        TokenizeSettings.from_dict(settings),
    )
    return out


def cmd_kiln(args) -> None:
    """Kiln's training stage, called as the `train` rule calls it, on prepared data."""
    import yaml

    t_start = time.time()
    spec = yaml.safe_load((REPO / "benchmarks" / "configs" / "train_gpu.yaml").read_text())
    settings = {**spec["training"], **json.loads(args.set or "{}")}
    if settings.get("backend") == "unsloth" or (settings.get("backend") == "auto"):
        try:
            import unsloth  # noqa: F401  (what the train rule does first when Unsloth will be used)
        except ImportError:
            pass
    from kiln.config import training_settings

    settings = training_settings(settings)  # defaults filled as the workflow does
    seq = args.seq
    if args.data == "random":
        tokenized = random_tokenized(
            args.shape, settings["per_device_batch_size"] * (settings["max_steps"] + 2) * 2, seq
        )
    else:
        tokenized = orders_tokenized(args.rows, args.packing, seq)
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import TrainingPaths, train

    run = WORK / "runs" / args.name
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    tokenize = TokenizeSettings(max_seq_len=seq, assistant_only_loss=True, packing=bool(args.packing))
    paths = TrainingPaths(
        str(tokenized),
        str(WORK / "models" / args.shape),
        str(run / "adapter"),
        str(run / "steps.jsonl"),
        str(run / "loss.png"),
        str(run / "summary.json"),
        str(run / "ckpt"),
    )
    summary = train(
        paths,
        TrainingSettings.from_dict(settings),
        tokenize,
        data_fingerprints={},
        experiment=args.name,
    )
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    timed = [r for r in steps if "loss" in r and r["step"] >= args.warmup]
    first, last = timed[0], timed[-1]
    seconds = last["time"] - first["time"]
    n_steps = last["step"] - first["step"]
    import datasets

    train_ds = datasets.load_from_disk(str(tokenized))["train"]
    if args.data == "random":
        tokens = n_steps * summary["micro_batch"] * summary["gradient_accumulation_steps"] * seq
    else:  # real rows: the non-pad tokens of the rows seen in the window
        import pyarrow.compute as pc

        total = int(pc.sum(pc.list_value_length(train_ds.data.column("input_ids"))).as_py())
        tokens = (last["epoch"] - first["epoch"]) * total
    emit(
        args.out,
        {
            "kind": "train",
            "name": args.name,
            "runner": "kiln train stage",
            "data": args.data,
            "packing": bool(args.packing),
            "shape": args.shape,
            "seq": seq,
            "backend": summary["backend"],
            "micro_batch": summary["micro_batch"],
            "effective_batch": summary["micro_batch"] * summary["gradient_accumulation_steps"],
            "micro_batch_probe": summary["micro_batch_probe"],
            "checkpointing": bool(settings.get("gradient_checkpointing")),
            "settings_changed": json.loads(args.set or "{}"),
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / n_steps,
            "timed_steps": n_steps,
            "peak_gib": (summary["peak_memory"].get("gpu_max_allocated_mb") or 0) / 1024,
            "n_params": n_params(args.shape),
            "loss_first": summary["first_loss"],
            "loss_last": summary["final_loss"],
            "losses": [[r["step"], r["loss"]] for r in steps if "loss" in r],
            "lm_head_loss": summary.get("lm_head_loss"),
            "lora_gemms": summary.get("lora_gemms"),
            "lora_gemms_fused": summary.get("lora_gemms_fused"),
            "lm_head_loss_reason": summary.get("lm_head_loss_reason"),
            "attention": summary.get("attention"),  # packed rows: the kernel, why, the isolation check
            "eval_loss": summary.get("eval_loss"),
            "rows_seen_epochs": last["epoch"],
            "card": card(),
            "wall_s": time.time() - t_start,
        },
    )


def true_flops_per_token(shape: str, seq: int, checkpointing: bool) -> float:
    """FLOPs a LoRA training step spends per token, counted rather than 6N: the forward (every
    matmul, LM head included, and causal attention), the backward of a frozen base (input gradients
    only: the same matmuls again, attention twice; the LoRA weights' own gradients are negligible),
    and the forward again when activations are recomputed (gradient checkpointing)."""
    c = SHAPES[shape]
    d, ff, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    matmul_params = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + c["vocab_size"] * d
    attention = layers * 2 * seq * d  # QK^T and AV, 2*seq*d each, halved by the causal mask
    forward = 2 * matmul_params + attention
    backward = 2 * matmul_params + 2 * attention
    return forward + backward + (forward if checkpointing else 0)


def cmd_table(args) -> None:
    rows = [json.loads(x) for x in (args.out / "results.jsonl").read_text().splitlines()]
    peak = next((r["tflops"] for r in rows if r["kind"] == "matmul"), None)
    lines = [
        f"Card: {next((r['card'] for r in rows if 'card' in r), '?')}; bf16 8192^3 matmul: "
        + (f"{peak:.0f} TFLOP/s" if peak else "not measured"),
        "",
        "| run | runner | shape | seq | micro x accum | ckpt | tokens/s | step s | peak GiB | 6N MFU | counted MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    trains = [r for r in rows if r["kind"] == "train"]
    for r in trains:
        accum = r["effective_batch"] // r["micro_batch"]
        ckpt = r.get("checkpointing")
        if r.get("oom"):
            lines.append(
                f"| {r['name']} | {r['runner']} | {r['shape']} | {r['seq']} | {r['micro_batch']} x {accum} | "
                f"{'on' if ckpt else 'off'} | out of memory | | | | |"
            )
            continue
        mfu = 6 * r["n_params"] * r["tokens_per_s"] / (peak * 1e12) if peak else float("nan")
        true = (
            true_flops_per_token(r["shape"], r["seq"], bool(ckpt)) * r["tokens_per_s"] / (peak * 1e12)
            if peak and r["shape"] in SHAPES
            else float("nan")
        )
        peak_gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['runner']} | {r['shape']} | {r['seq']} | {r['micro_batch']} x {accum} | "
            f"{'on' if ckpt else 'off' if ckpt is not None else '?'} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
            f"{peak_gib} | {mfu:.1%} | {true:.1%} |"
        )
    # Each runner at its best (same shape and seq), and Kiln's stage against each.
    best: dict = {}
    for r in trains:
        if r.get("tokens_per_s") and not r.get("documented_default"):
            key = (r["runner"], r["shape"], r["seq"])
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
    kiln = {(k[1], k[2]): v for k, v in best.items() if k[0] == "kiln train stage"}
    lines += ["", "Each runner at its best setting found, and Kiln's stage (automatic settings) against it:", ""]
    lines += ["| runner | shape | seq | best run | tokens/s | Kiln / it |", "|---|---|---|---|---|---|"]
    for (runner, shape, seq), r in sorted(best.items()):
        k = kiln.get((shape, seq))
        ratio = f"{k['tokens_per_s'] / r['tokens_per_s']:.2f}" if k else "-"
        lines.append(f"| {runner} | {shape} | {seq} | {r['name']} | {r['tokens_per_s']:,.0f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)


# ---- the plan -----------------------------------------------------------------------------------
PLAN = {
    # part 1: the three the targets compare, in one call on one card
    "1": [
        ["matmul"],
        ["make", "--shape", "qwen2.5-0.5b"],
        ["loop", "--name", "hf_loop_bs8", "--backend", "hf", "--bs", "8"],
        ["loop", "--name", "unsloth_loop_bs8", "--backend", "unsloth", "--bs", "8"],
        ["kiln", "--name", "kiln_stage"],
    ],
    # part 2: the levers, one at a time from Kiln's stage before them (and the batch lever alone on
    # the plain Unsloth loop)
    "2": [
        ["matmul"],
        ["make", "--shape", "qwen2.5-0.5b"],
        [
            "kiln",
            "--name",
            "lever0_kiln_bs8_no_levers",
            "--set",
            '{"per_device_batch_size": 8, "auto_micro_batch": false, "step_metrics": true, "logging_steps": 1,'
            ' "gradient_checkpointing": true}',
        ],
        [
            "kiln",
            "--name",
            "lever1_lean_step_bs8",
            "--set",
            '{"per_device_batch_size": 8, "auto_micro_batch": false, "gradient_checkpointing": true}',
        ],
        [
            "kiln",
            "--name",
            "lever2_auto_batch_with_step_metrics",
            "--set",
            '{"step_metrics": true, "gradient_checkpointing": true}',
        ],
        ["kiln", "--name", "lever2b_auto_batch_lean", "--set", '{"gradient_checkpointing": true}'],
        ["loop", "--name", "unsloth_loop_bs64", "--backend", "unsloth", "--bs", "64", "--steps", "10"],
    ],
    # part 3: packing, on the default task's real rows (SmolLM2-135M shape, its tokenizer)
    "3": [
        ["make", "--shape", "smollm2-135m"],
        ["kiln", "--name", "orders_unpacked", "--data", "orders", "--shape", "smollm2-135m", "--seq", "2048"],
        [
            "kiln",
            "--name",
            "orders_packed",
            "--data",
            "orders",
            "--shape",
            "smollm2-135m",
            "--seq",
            "2048",
            "--packing",
        ],
    ],
}


# the fair comparison (issue 16): each peer swept over micro-batch and checkpointing, plus the
# documented default of Unsloth's notebooks (2 x 4, its checkpointing), and Kiln's stage with its
# automatic settings; one card, two device calls (parts "f1" and "f2")
PLAN["f1"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b"],
    ["loop", "--name", "hf_ckpt", "--backend", "hf", "--ckpt", "on", "--bs", "8", "16", "32"],
    ["loop", "--name", "hf_nockpt", "--backend", "hf", "--ckpt", "off", "--bs", "4", "8", "16"],
    ["loop", "--name", "unsloth_ckpt", "--backend", "unsloth", "--ckpt", "on", "--bs", "16", "32", "64"],
    ["loop", "--name", "unsloth_nockpt", "--backend", "unsloth", "--ckpt", "off", "--bs", "16", "32", "64"],
]
PLAN["f2"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b"],
    ["sft", "--name", "unsloth_sft_default", "--ckpt", "on", "--bs", "2", "--accum", "4", "--default"],
    ["sft", "--name", "unsloth_sft_ckpt", "--ckpt", "on", "--bs", "16", "32", "--accum", "1", "1"],
    ["sft", "--name", "unsloth_sft_nockpt", "--ckpt", "off", "--bs", "16", "32", "--accum", "1", "1"],
    ["kiln", "--name", "kiln_stage_auto", "--set", "{}"],
]
# Kiln's stage beside the best peer setting found in f1/f2, re-measured in the same call
PLAN["f3"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b"],
    ["kiln", "--name", "kiln_stage_auto", "--set", "{}"],
    ["loop", "--name", "unsloth_nockpt", "--backend", "unsloth", "--ckpt", "off", "--bs", "32", "64"],
]


# issue 16 item 4: real rows, packed. Kiln's stage packed (and unpacked) beside Unsloth through
# TRL's SFTTrainer with its own packing on (bfd, padding-free), swept over its micro-batch, plus its
# documented default (2 x 4, checkpointing); effective (non-pad) tokens/s, SmolLM2-135M shape
PLAN["f4"] = [
    ["matmul"],
    ["make", "--shape", "smollm2-135m"],
    ["kiln", "--name", "orders_packed", "--data", "orders", "--shape", "smollm2-135m", "--packing"],
    ["kiln", "--name", "orders_unpacked", "--data", "orders", "--shape", "smollm2-135m"],
    ["sft", "--name", "unsloth_sft_packed_nockpt", "--data", "orders", "--packing", "--shape", "smollm2-135m"]
    + ["--ckpt", "off", "--bs", "16", "32", "64", "--accum", "1", "1", "1"],
    ["sft", "--name", "unsloth_sft_packed_default", "--data", "orders", "--packing", "--shape", "smollm2-135m"]
    + ["--ckpt", "on", "--bs", "2", "--accum", "4", "--default"],
]
# issue 16 items 2 and 3 at two more shapes: Kiln's stage (automatic settings) beside the plain
# Unsloth loop swept over micro-batch with checkpointing off and on
SHORT = '{"max_steps": 15}'
PLAN["f5"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b", "qwen2.5-1.5b"],
    ["kiln", "--name", "kiln_stage_auto_0.5b_seq4096", "--seq", "4096", "--set", SHORT],
    ["loop", "--name", "unsloth_nockpt_0.5b_seq4096", "--backend", "unsloth", "--ckpt", "off", "--seq", "4096"]
    + ["--bs", "8", "16", "32", "--steps", "10"],
    ["loop", "--name", "unsloth_ckpt_0.5b_seq4096", "--backend", "unsloth", "--ckpt", "on", "--seq", "4096"]
    + ["--bs", "16", "32", "--steps", "10"],
    ["kiln", "--name", "kiln_stage_auto_1.5b_seq2048", "--shape", "qwen2.5-1.5b", "--set", SHORT],
    ["loop", "--name", "unsloth_nockpt_1.5b_seq2048", "--backend", "unsloth", "--ckpt", "off"]
    + ["--shape", "qwen2.5-1.5b", "--bs", "16", "32", "64", "--steps", "10"],
    ["loop", "--name", "unsloth_ckpt_1.5b_seq2048", "--backend", "unsloth", "--ckpt", "on"]
    + ["--shape", "qwen2.5-1.5b", "--bs", "32", "64", "--steps", "10"],
]

# f5 split in two device calls (each under the 10-minute limit of one call)
PLAN["f5a"] = [PLAN["f5"][0], ["make", "--shape", "qwen2.5-0.5b"], *PLAN["f5"][2:5]]
PLAN["f5b"] = [PLAN["f5"][0], ["make", "--shape", "qwen2.5-1.5b"], *PLAN["f5"][5:]]
# issue 16 item 2's levers, one at a time on the plain Unsloth loop at its best shape and setting
# (0.5B, seq 2048, no checkpointing), beside the loop without them in the same call, and a profile
# of its step (where the GPU time goes)
PLAN["f6"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b"],
    ["loop", "--name", "unsloth_nockpt", "--backend", "unsloth", "--ckpt", "off", "--bs", "32", "--profile"],
    ["loop", "--name", "lever_liger_flce", "--backend", "unsloth", "--ckpt", "off", "--bs", "32", "64"]
    + ["--lever", "liger_flce"],
    ["loop", "--name", "lever_expandable_segments", "--backend", "unsloth", "--ckpt", "off", "--bs", "64", "96"]
    + ["--lever", "expandable_segments"],
]

# the lever that helped on the loop (Liger's fused linear cross-entropy), in Kiln's stage:
# training.lm_head_loss auto (Liger on this path) beside model (Unsloth's own fused loss), same
# seed and data (their loss curves compared), and the best plain loop again, one call
# f8: f7 again after the fix (the hidden states cast back to the head's bf16), 15 steps each
PLAN["f8"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b"],
    ["kiln", "--name", "kiln_stage_auto_liger_fixed", "--set", '{"lm_head_loss": "auto", "max_steps": 15}'],
    ["kiln", "--name", "kiln_stage_auto_model_loss", "--set", '{"lm_head_loss": "model", "max_steps": 15}'],
]
PLAN["f7"] = [
    ["matmul"],
    ["make", "--shape", "qwen2.5-0.5b"],
    ["kiln", "--name", "kiln_stage_auto_liger", "--set", '{"lm_head_loss": "auto"}'],
    ["kiln", "--name", "kiln_stage_auto_model_loss", "--set", '{"lm_head_loss": "model"}'],
    ["loop", "--name", "unsloth_nockpt", "--backend", "unsloth", "--ckpt", "off", "--bs", "64"],
]


# issue 28: Kiln's fused LoRA GEMMs (kiln.fused_lora), one call per shape: the plain Unsloth loop at
# its best setting of the fair sweep (no checkpointing, the largest micro-batch that fits) beside the
# same loop with the fused GEMMs installed (same seed and data: loss curves compared step by step;
# tolerance set before the run: within 0.5% relative at every step) and Kiln's stage with
# lora_gemms: fused and with separate.
def fused_race(shape: str, bs: str, steps: str = "10") -> list[list[str]]:
    loop = ["loop", "--backend", "unsloth", "--ckpt", "off", "--shape", shape, "--bs", bs, "--steps", steps]
    short = '{"max_steps": 15, "lora_gemms": "%s"}'
    return [
        ["matmul"],
        ["make", "--shape", shape],
        [*loop, "--name", f"unsloth_nockpt_{shape}"],
        [*loop, "--name", f"unsloth_nockpt_fused_{shape}", "--lever", "kiln_fused"],
        ["kiln", "--name", f"kiln_stage_fused_{shape}", "--shape", shape, "--set", short % "fused"],
        ["kiln", "--name", f"kiln_stage_separate_{shape}", "--shape", shape, "--set", short % "separate"],
    ]


PLAN["g1"] = fused_race("qwen2.5-0.5b", "64")
PLAN["g2"] = fused_race("qwen2.5-1.5b", "32")
PLAN["g3"] = fused_race("llama-3-8b", "8")


# issue 23: the honest race. Packed training that keeps documents apart (Kiln's collator and a varlen
# kernel), beside Kiln unpacked and Unsloth + TRL's SFTTrainer with its own packing, swept over its
# micro-batch with checkpointing off and on, and at its documented default (2 x 4, checkpointing);
# the default task's real rows, effective (non-pad) tokens/s, one call per shape
def race(shape: str, sweep: list[str], sft_steps: tuple[str, ...] = ()) -> list[list[str]]:
    data = ["--data", "orders", "--shape", shape]
    sft = [*data, *sft_steps]
    return [
        ["matmul"],
        ["make", "--shape", "smollm2-135m", shape],
        ["kiln", "--name", f"kiln_packed_{shape}", *data, "--packing"],
        ["kiln", "--name", f"kiln_unpacked_{shape}", *data],
        ["sft", "--name", f"unsloth_sft_packed_nockpt_{shape}", *sft, "--packing", "--ckpt", "off", "--bs", *sweep]
        + ["--accum", *["1"] * len(sweep)],
        ["sft", "--name", f"unsloth_sft_packed_ckpt_{shape}", *sft, "--packing", "--ckpt", "on", "--bs", sweep[-1]],
        ["sft", "--name", f"unsloth_sft_packed_default_{shape}", *sft, "--packing", "--ckpt", "on", "--bs", "2"]
        + ["--accum", "4", "--default"],
    ]


PLAN["p1"] = race("smollm2-135m", ["16", "32", "64"])
# the 0.5B shape in one device call: the peer's runs 3 warm-up + 8 timed steps each
PLAN["p3"] = race("qwen2.5-0.5b", ["16", "32"], ("--warmup", "3", "--steps", "8"))
# validation loss after the same rows seen, packed vs unpacked: about the same documents per optimizer
# step (4 packed rows of ~14 documents vs 56 rows), 100 steps each, the whole validation split scored
# at the end (packed: through the same isolated collator). Tolerance set before the run: the packed
# run's validation loss within 3% of the unpacked one's.
EVAL = '"max_steps": 100, "eval_steps": 100, "eval_samples": 100000, "auto_micro_batch": false'
PLAN["p2"] = [
    ["make", "--shape", "smollm2-135m"],
    ["kiln", "--name", "loss_packed", "--data", "orders", "--shape", "smollm2-135m", "--packing", "--warmup", "1"]
    + ["--set", "{" + EVAL + ', "per_device_batch_size": 4}'],
    ["kiln", "--name", "loss_unpacked", "--data", "orders", "--shape", "smollm2-135m", "--warmup", "1"]
    + ["--set", "{" + EVAL + ', "per_device_batch_size": 56}'],
]


def cmd_all(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    parts = ["1", "2", "3"] if args.part == "all" else args.part.split(",")
    for part in parts:
        for cmd in PLAN[part]:
            extra = ["--out", str(args.out)]
            t = time.time()
            print(f"=== {' '.join(cmd)}", flush=True)
            proc = subprocess.run([sys.executable, __file__, *cmd, *extra], cwd=REPO)
            print(f"=== exit {proc.returncode} after {time.time() - t:.0f} s", flush=True)
    cmd_table(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "matmul", "make", "loop", "sft", "kiln", "table"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    sub.choices["all"].add_argument("--part", default="1", help="1, 2, 3, f1..f8, p1..p3, g1..g3, all, or a comma list")
    sub.choices["make"].add_argument("--shape", nargs="+", required=True)
    for name in ("loop", "sft", "kiln"):
        p = sub.choices[name]
        p.add_argument("--name", required=True)
        p.add_argument("--shape", default="qwen2.5-0.5b")
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--warmup", type=int, default=5)
    loop = sub.choices["loop"]
    loop.add_argument("--backend", choices=["hf", "unsloth"], required=True)
    levers = ["none", "liger_flce", "expandable_segments", "kiln_fused"]
    loop.add_argument("--lever", choices=levers, default="none")
    loop.add_argument("--profile", action="store_true", help="profile 3 more steps after the timed ones")
    for name in ("loop", "sft"):
        p = sub.choices[name]
        p.add_argument("--bs", type=int, nargs="+", default=[8], help="micro-batches, ascending")
        p.add_argument("--ckpt", choices=["on", "off"], default="on", help="gradient checkpointing")
        p.add_argument("--steps", type=int, default=20)
    sft = sub.choices["sft"]
    sft.add_argument("--accum", type=int, nargs="+", default=[1])
    sft.add_argument("--default", action="store_true", help="label the run as the documented default")
    kiln = sub.choices["kiln"]
    kiln.add_argument("--set", help="JSON of training settings to change from the config")
    for name in ("kiln", "sft"):
        p = sub.choices[name]
        p.add_argument("--data", choices=["random", "orders"], default="random")
        p.add_argument("--packing", action="store_true")
        p.add_argument("--rows", type=int, default=20000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    commands = {"all": cmd_all, "matmul": cmd_matmul, "make": cmd_make, "loop": cmd_loop, "sft": cmd_sft}
    commands |= {"kiln": cmd_kiln, "table": cmd_table}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
