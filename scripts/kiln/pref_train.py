"""The preference-tuning recipe (issue 27): kiln.train's phases around TRL's DPOTrainer.

What differs from SFT: the model is the SFT experiment's adapter on the 4-bit base, trainable, with
a frozen copy of it as the reference (kiln.dpo.load_policy); the data are tokenized
pairs; the trainer is TRL's DPOTrainer (kiln.dpo). Resume, checkpoints recorded complete before
rotation, the step log, the adapter and its experiment.json are kiln.train's, unchanged: the result
is an adapter of the same shape on the same base, so merge, export, serving and the audit read it
like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from kiln.dpo import PAIR_COLUMNS, dpo_args, dpo_trainer_class, ensure_logprob_kernel, load_policy
from kiln.steplog import STEP_LOG, step_logger
from kiln.tracking import mlflow_setup
from kiln.train import TrainingJob, run_job

log = logging.getLogger(__name__)


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """sha256 of an adapter's weights and config: a retrained SFT adapter is another starting point
    (the run key changes, old checkpoints are set aside)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((Path(adapter_dir) / name).read_bytes())
    return h.hexdigest()


class PreferenceJob(TrainingJob):
    """One DPO run: setup -> build_trainer -> fit -> save -> summarize, as kiln.train.TrainingJob."""

    def setup(self) -> None:
        if not self.paths.start_adapter:
            raise ValueError(f"method {self.s.method}: no SFT adapter to start from (training.from_experiment)")
        super().setup()

    def _resolve_backend(self) -> tuple[str, str]:
        # kiln.preference.preference_problem refuses backend: unsloth; auto is hf here, CPU or GPU
        return "hf", f"method {self.s.method}: TRL's DPOTrainer on transformers + PEFT + bitsandbytes"

    def _load_model(self):
        from kiln.backends import load_hf

        base, _ = load_hf(self.paths.base_dir, self.s, self.dtype)
        log.info("policy: the SFT adapter %s, trainable (TRL copies it, frozen, as 'ref')", self.paths.start_adapter)
        return load_policy(base, self.paths.start_adapter), None

    def _load_data(self, data) -> None:
        missing = [c for c in PAIR_COLUMNS if c not in data["train"].column_names]
        if missing:
            raise ValueError(
                f"{self.paths.tokenized_dir} holds no tokenized pairs (no {', '.join(missing)}): method "
                f"{self.s.method} trains on a dataset of prompt/chosen/rejected records"
            )
        self.train_ds = data["train"].select_columns(list(PAIR_COLUMNS))
        self.eval_ds = None
        if self.s.eval_steps and len(data["validation"]):
            n_eval = min(self.s.eval_samples, len(data["validation"]))
            self.eval_ds = data["validation"].select(range(n_eval)).select_columns(list(PAIR_COLUMNS))
        self.packed = False
        self.early = False

    def build_trainer(self) -> None:
        import torch

        self.lean = False
        self.collator, self.isolation = None, None
        self.kernel = ensure_logprob_kernel()
        log.info("DPO log-probabilities: %s", self.kernel)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.ckpt / "tensorboard")
        report_to = ["tensorboard"] + mlflow_setup(self.tracking, self.experiment)
        self.trainer = dpo_trainer_class()(
            model=self.model,
            ref_model=None,
            args=dpo_args(self, report_to),
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            processing_class=self.tokenizer,
            adapter_dtype=self.dtype if self.dtype == torch.float32 else None,
            callbacks=[step_logger(self.ckpt / STEP_LOG, self.start_step)] if self.main else [],
        )

    def summarize(self) -> dict:
        summary = super().summarize()
        last = next((r for r in reversed(self._history()) if "rewards/margins" in r), {})
        summary["lm_head_loss"] = "trl_dpo"  # TRL's DPO loss over its fused per-token log-probabilities
        summary["lm_head_loss_reason"] = f"method {self.s.method}: {self.kernel}"
        summary["preference"] = {
            "method": self.s.method,
            "from_experiment": self.s.from_experiment,
            "beta": self.s.beta,
            "loss_type": self.s.loss_type,
            "sft_weight": self.s.sft_weight,
            "reference": "the SFT adapter, frozen (adapter 'ref'), on the same base",
            "log_prob_kernel": self.kernel,
            "final_reward_accuracy": last.get("rewards/accuracies"),
            "final_reward_margin": last.get("rewards/margins"),
        }
        Path(self.paths.summary_path).write_text(json.dumps(summary, indent=2))
        return summary

    def _history(self) -> list[dict]:
        return [json.loads(ln) for ln in Path(self.paths.step_log_out).read_text().splitlines()]


def train_preference(*args, **kwargs) -> dict:
    """kiln.train.train's counterpart for training.method dpo (same arguments, same summary)."""
    return run_job(PreferenceJob(*args, **kwargs))
