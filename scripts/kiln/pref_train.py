"""The preference-tuning recipe (issue 27): kiln.train's phases around TRL's DPOTrainer (method dpo),
KTOTrainer (kto) or ORPOTrainer (orpo).

What differs from SFT: the model is the SFT experiment's adapter on the 4-bit base, trainable, with
a frozen copy of it as the reference for dpo and kto (kiln.dpo.load_policy; orpo has none); the data
are tokenized preference rows; the trainer is TRL's (kiln.dpo, kiln.kto, kiln.orpo). Resume, checkpoints
recorded complete before rotation, the step log, the adapter and its experiment.json are
kiln.train's, unchanged: the result is an adapter of the same shape on the same base, so merge,
export, serving and the audit read it like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from kiln.dpo import PAIR_COLUMNS, dpo_args, dpo_trainer_class, ensure_logprob_kernel, load_policy
from kiln.kto import kto_args, kto_trainer_class
from kiln.orpo import orpo_args, orpo_trainer_class
from kiln.steplog import STEP_LOG, step_logger
from kiln.tracking import mlflow_setup
from kiln.train import TrainingJob, run_job

log = logging.getLogger(__name__)

# method -> (TRL's trainer, Kiln's subclass of it, its config)
TRAINERS = {
    "dpo": ("DPOTrainer", dpo_trainer_class, dpo_args),
    "kto": ("KTOTrainer", kto_trainer_class, kto_args),
    "orpo": ("ORPOTrainer", orpo_trainer_class, orpo_args),
}


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
        return "hf", f"method {self.s.method}: TRL's {TRAINERS[self.s.method][0]} on transformers + PEFT + bitsandbytes"

    def _load_model(self):
        from kiln.backends import load_hf

        base, _ = load_hf(self.paths.base_dir, self.s, self.dtype)
        copy = "no reference (orpo)" if self.s.method == "orpo" else "TRL copies it, frozen, as 'ref'"
        log.info("policy: the SFT adapter %s, trainable (%s)", self.paths.start_adapter, copy)
        return load_policy(base, self.paths.start_adapter), None

    def _load_data(self, data) -> None:
        missing = [c for c in PAIR_COLUMNS if c not in data["train"].column_names]
        if missing:
            raise ValueError(
                f"{self.paths.tokenized_dir} holds no tokenized preference rows (no {', '.join(missing)}): method "
                f"{self.s.method} trains on a dataset of prompt/chosen/rejected (or, for kto, prompt/completion/"
                "label) records"
            )
        if self.s.method in ("dpo", "orpo"):
            one_sided = next(
                (i for i, (c, r) in enumerate(zip(*(data["train"][k] for k in PAIR_COLUMNS[1:]))) if not (c and r)),
                None,
            )
            if one_sided is not None:
                raise ValueError(
                    f"{self.paths.tokenized_dir}: train row {data['train'][one_sided]['kiln_id']} has one answer "
                    f"(KTO's unpaired format): method {self.s.method} trains on pairs; train such rows with method kto"
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
        self.kernel = (
            "ORPOTrainer's own (full logits)" if self.s.method == "orpo" else ensure_logprob_kernel()
        )  # dpo and kto: TRL's chunked LM head, or its torch stand-in on a CPU
        log.info("%s log-probabilities: %s", self.s.method.upper(), self.kernel)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.ckpt / "tensorboard")
        report_to = ["tensorboard"] + mlflow_setup(self.tracking, self.experiment)
        _, trainer_class, args = TRAINERS[self.s.method]
        reference = {} if self.s.method == "orpo" else {"ref_model": None}  # orpo has no reference
        self.trainer = trainer_class()(
            model=self.model,
            **reference,
            args=args(self, report_to),
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            processing_class=self.tokenizer,
            adapter_dtype=self.dtype if self.dtype == torch.float32 else None,
            callbacks=[step_logger(self.ckpt / STEP_LOG, self.start_step)] if self.main else [],
        )

    def summarize(self) -> dict:
        summary = super().summarize()
        last = next((r for r in reversed(self._history()) if any(k.startswith("rewards/") for k in r)), {})
        # TRL's preference loss over its fused per-token log-probabilities
        summary["lm_head_loss"] = f"trl_{self.s.method}"
        summary["lm_head_loss_reason"] = f"method {self.s.method}: {self.kernel}"
        summary["preference"] = {
            "method": self.s.method,
            "from_experiment": self.s.from_experiment,
            "beta": self.s.beta,
            "loss_type": self.s.loss_type,
            "sft_weight": self.s.sft_weight,
            "reference": "none (orpo)"
            if self.s.method == "orpo"
            else "the SFT adapter, frozen (adapter 'ref'), on the same base",
            "log_prob_kernel": self.kernel,
            # the last logged step's rewards as TRL logs them (dpo: accuracies and margins of pairs;
            # kto: the mean reward of the desirable and the undesirable answers, and the KL estimate;
            # orpo: its rewards are beta x the answers' mean log-probabilities, its odds ratio beside)
            "final_rewards": {
                k: v for k, v in last.items() if k.startswith("rewards/") or k in ("kl", "log_odds_ratio", "nll_loss")
            },
        }
        if self.s.method == "kto":
            summary["preference"].update(
                desirable_weight=self.s.desirable_weight, undesirable_weight=self.s.undesirable_weight
            )
        Path(self.paths.summary_path).write_text(json.dumps(summary, indent=2))
        return summary

    def _history(self) -> list[dict]:
        return [json.loads(ln) for ln in Path(self.paths.step_log_out).read_text().splitlines()]


def train_preference(*args, **kwargs) -> dict:
    """kiln.train.train's counterpart for training.method dpo, kto and orpo (same arguments, same summary)."""
    return run_job(PreferenceJob(*args, **kwargs))
