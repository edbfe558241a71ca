"""Shared fixtures: the repository paths, a tiny model config, and helpers to run Snakemake for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kiln.synthetic import ANSWER_SCHEMA

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "fixtures" / "smollm2-tokenizer"
# `python -m snakemake` of this interpreter: works in a venv and where snakemake is only importable.
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# The `kiln` console script installed beside this interpreter (pyproject.toml [project.scripts]).
KILN = [str(Path(sys.executable).parent / "kiln")]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(rows: int = 60, max_steps: int = 4, **training) -> dict:
    """A Llama-shaped model of 2 layers with random weights, the SmolLM2 tokenizer, a few dozen rows."""
    return {
        "results": "results",
        "datasets": {
            "orders": {
                "sources": [{"name": "synthetic", "kind": "synthetic", "rows": rows, "seed": 7, "mess_rate": 0.2}],
                "clean": {
                    "min_chars": 10,
                    "max_chars": 4000,
                    "answer_schema": ANSWER_SCHEMA,
                },
                "build": {"validation": 0.1, "test": 0.15, "seed": 0},
            }
        },
        "models": {
            "tiny": {
                "kind": "random",
                "tokenizer_from": str(TOKENIZER),
                "seed": 0,
                "architecture": {
                    "model_type": "llama",
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 512,
                    "tie_word_embeddings": True,
                },
            }
        },
        "experiments": {
            "tiny": {
                "dataset": "orders",
                "model": "tiny",
                "tokenize": {"max_seq_len": 192},
                "training": {
                    "max_steps": max_steps,
                    "per_device_batch_size": 4,
                    "learning_rate": 0.002,
                    "eval_steps": 2,
                    "eval_samples": 4,
                    "save_steps": 2,
                    "warmup_ratio": 0.0,
                    "lora_r": 4,
                    "lora_alpha": 8,
                    **training,
                },
                "evaluate": {"max_samples": 6, "batch_size": 6, "max_new_tokens": 8},
            }
        },
    }


class Workflow:
    """A real `snakemake` run of this repository's Snakefile in a temporary working directory."""

    def __init__(self, workdir: Path, config: dict):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yaml"
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self, *targets: str, cores: int = 2) -> list[str]:
        return [
            *SNAKEMAKE,
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(self.workdir),
            "--configfile",
            str(self.config_path),
            "--cores",
            str(cores),
            *targets,
        ]

    def run(self, *targets: str, check: bool = True, dry: bool = False) -> subprocess.CompletedProcess:
        cmd = self.command(*targets) + (["-n", "--quiet", "rules"] if dry else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir)
        if check and proc.returncode:
            raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return proc

    def planned_rules(self, *targets: str) -> dict[str, int]:
        """Rule -> job count of what a run would do now (a dry run's job table)."""
        out = self.run(*targets, dry=True).stdout
        plan, in_table = {}, False
        for line in out.splitlines():
            parts = line.split()
            if parts[:2] == ["job", "count"]:
                in_table = True
                continue
            if in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                plan[parts[0]] = int(parts[1])
        return plan

    def path(self, *parts: str) -> Path:
        return self.workdir / "results" / Path(*parts)


@pytest.fixture
def workflow_factory(tmp_path):
    def make(config: dict | None = None) -> Workflow:
        return Workflow(tmp_path, config or tiny_config())

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny pipeline built once, end to end, for the tests that only read its outputs."""
    wf = Workflow(tmp_path_factory.mktemp("tiny"), tiny_config())
    wf.run()
    return wf


def train_paths(tokenized, base, folder: Path):
    """kiln.train.TrainingPaths: reading ``tokenized`` and ``base``, every output under ``folder``."""
    from kiln.train import TrainingPaths

    return TrainingPaths(
        tokenized_dir=str(tokenized),
        base_dir=str(base),
        adapter_dir=str(folder / "adapter"),
        step_log_out=str(folder / "s.jsonl"),
        loss_png=str(folder / "l.png"),
        summary_path=str(folder / "sum.json"),
        ckpt_dir=str(folder / "ckpt"),
    )


def train_tiny(tiny_run, folder: Path, **overrides) -> dict:
    """kiln.train.train on the tiny run's tokenized data and base model, outputs under ``folder``;
    the tiny experiment's training settings with ``overrides``. The summary."""
    from kiln.config import training_settings
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import train

    settings = {**training_settings(), **tiny_run.config["experiments"]["tiny"]["training"], **overrides}
    tokenized = next(tiny_run.path("data/orders/tokenized").glob("tiny-*[!.json]"))
    return train(
        train_paths(tokenized, tiny_run.path("base/tiny"), folder),
        settings=TrainingSettings.from_dict(settings),
        tokenize=TokenizeSettings(max_seq_len=192),
        data_fingerprints={"train": "x"},
        experiment="t",
    )


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
