"""Does packed training keep documents apart? Through the real trainer that kiln.train builds.

Shared by the CPU test (tests/test_packing.py, backend hf) and the GPU test (tests/test_gpu.py,
backends hf and unsloth, run on the device).
"""

from __future__ import annotations

from pathlib import Path

from conftest import train_paths


def packed_job(base_dir: Path, dataset_dir: Path, folder: Path, max_seq_len: int = 512, **training):
    """kiln.train's TrainingJob on packed tokens of ``dataset_dir``, set up and with its trainer built."""
    from kiln.config import training_settings
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.tokenize import tokenize_dataset
    from kiln.train import TrainingJob

    tokenize = TokenizeSettings(max_seq_len=max_seq_len, assistant_only_loss=True, packing=True)
    tokenize_dataset(dataset_dir, base_dir, folder / "packed", folder / "packed.json", tokenize)
    settings = {
        "max_steps": 2,
        "eval_steps": 0,
        "per_device_batch_size": 2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,  # the same forward every time: losses compared exactly
        **training,
    }
    job = TrainingJob(
        train_paths(folder / "packed", base_dir, folder),
        settings=TrainingSettings.from_dict(training_settings(settings)),
        tokenize=tokenize,
        data_fingerprints={"train": "x"},
        experiment="packcheck",
    )
    job.setup()
    job.build_trainer()
    return job


def summed_loss(trainer, batch: dict):
    """The trainer's own compute_loss (a mean over the labelled tokens) times their count: the summed NLL."""
    import torch

    model = trainer.model
    with torch.no_grad():
        inputs = trainer._prepare_inputs(batch)
        scored = (inputs["labels"][:, 1:] != -100).sum()
        return (trainer.compute_loss(model, inputs) * scored).double().item()


def documents(batch: dict) -> list[dict]:
    """The documents of a padding-free [1, T] batch, each as a row for the collator."""
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1).tolist() + [batch["input_ids"].shape[1]]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return [
        {"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist(), "seq_lengths": [b - a]}
        for a, b in zip(starts, starts[1:], strict=False)
        if b > a
    ]


def packed_vs_alone(job) -> dict:
    """One batch of the trainer's own get_train_dataloader(): its summed loss, the sum of its
    documents' losses each alone, and the same documents run as one causal sequence."""
    trainer = job.trainer
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    docs = documents(batch)
    packed = summed_loss(trainer, batch)
    alone = sum(summed_loss(trainer, job.collator([d])) for d in docs)
    one_sequence = {
        "input_ids": [t for d in docs for t in d["input_ids"]],
        "labels": [t for d in docs for t in d["labels"]],
        "seq_lengths": [sum(len(d["input_ids"]) for d in docs)],
    }
    contaminated = summed_loss(trainer, job.collator([one_sequence]))
    return {
        "shape": list(batch["input_ids"].shape),
        "has_position_ids": "position_ids" in batch,
        "documents": len(docs),
        "packed": packed,
        "alone": alone,
        "contaminated": contaminated,
        "attention": job.attention.to_dict(),
        "isolation": job.isolation,
    }


def sharpen(base: Path, out: Path) -> Path:
    """A copy of ``base`` with its query and key weights scaled up: attention that depends on its
    context (a random model's barely does: packed after another, a document's summed loss moved by
    3e-6 of itself, below any tolerance that would let a test fail)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12.0)
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def base_and_dataset(folder: Path) -> tuple[Path, Path]:
    """Without Snakemake (the GPU machine has none): the tiny config's random model, sharpened, and
    its synthetic order rows through Kiln's own collect, clean and build functions."""
    from conftest import TOKENIZER, tiny_config

    from kiln.base_model import prepare_base_model
    from kiln.clean import clean_shard
    from kiln.dataset import build_dataset
    from kiln.experiment import ModelSpec
    from kiln.sources import canonical_rows, write_raw
    from kiln.spec import BuildSettings, CleanSettings
    from kiln.synthetic import ANSWER_SCHEMA, generate

    cfg = tiny_config()
    spec = ModelSpec.from_config("tiny", cfg["models"]["tiny"])
    prepare_base_model(spec, folder / "random", tokenizer_dir=TOKENIZER, dtype="float32")
    base = sharpen(folder / "random", folder / "sharp")
    records = generate(80, seed=7, mess_rate=0.0)
    items = ((i, r, __import__("json").dumps(r), None) for i, r in enumerate(records, 1))
    write_raw(canonical_rows(items, source="synthetic", file="t", fmt="auto", columns={}), folder / "raw.parquet")
    clean = {"min_chars": 10, "max_chars": 4000, "answer_schema": ANSWER_SCHEMA}
    clean_shard(
        folder / "raw.parquet",
        folder / "clean.parquet",
        folder / "rej.parquet",
        folder / "c.json",
        CleanSettings.from_dict(clean),
    )
    build = BuildSettings(validation=0.1, test=0.1, contamination_audit=False)
    build_dataset([str(folder / "clean.parquet")], folder / "dataset", folder / "b.parquet", folder / "b.json", build)
    return base, folder / "dataset"
