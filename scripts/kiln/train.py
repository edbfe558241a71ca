"""QLoRA training recipe: tokenized data + base model -> LoRA adapter, step log, loss curve.

Phases (TrainingJob), run in order by ``train()``: setup -> build_trainer -> fit -> save -> summarize.

Supports: an NF4 base (or none: plain LoRA), PEFT LoRA, TRL's SFTTrainer on pre-tokenized data (loss
on the ``assistant_masks`` tokens), periodic validation, early stopping, seeded runs, checkpoints.

Saves: the adapter with ``experiment.json`` beside it (data, model, settings and what training
resolved: everything merge, evaluate and the manifest need), a step log, a loss PNG, a summary.

Resume: checkpoints live outside Snakemake's outputs, keyed by the inputs (data, base weights, settings,
code): the same key resumes from the newest complete one (kiln.checkpoints), another sets them aside.

Several GPUs: kiln.launch runs this recipe in N processes (DDP, or FSDP: kiln.parallel); only the
main process writes. On Unsloth the LoRA GEMMs may be Kiln's fused ones (kiln.fused_lora).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.backends import install_fused_lora, load_for_training, resolve_backend, resolve_lora_gemms
from kiln.checkpoints import prepare_checkpoints, run_key
from kiln.codedeps import code_files
from kiln.dtypes import compute_dtype
from kiln.losses import liger_sum_loss, resolve_head_loss
from kiln.microbatch import auto_micro_batch, split_batch
from kiln.packing import PackedCollator, check_isolation, plan_attention, varlen_calls
from kiln.parallel import enable_fsdp, gathered_state
from kiln.provenance import peak_memory_mb
from kiln.spec import TokenizeSettings, TrainingSettings
from kiln.steplog import STEP_LOG, estimated_tokens, plot_loss, step_logger
from kiln.tracking import mlflow_setup
from kiln.trained import TrainedAdapter
from kiln.trainer import sft_args, sft_trainer_class

log = logging.getLogger(__name__)
# The code a checkpoint was made by (this module and what it runs): another version starts again.
TRAINING_CODE = code_files(__file__)


@dataclass(frozen=True)
class TrainingPaths:
    """Where a training job reads (tokenized data, base model) and writes (the rest)."""

    tokenized_dir: str
    base_dir: str
    adapter_dir: str
    step_log_out: str
    loss_png: str
    summary_path: str
    ckpt_dir: str  # checkpoints: a folder Snakemake does not own (resume survives a failed job)
    start_adapter: str = ""  # method dpo: the SFT experiment's adapter (kiln.pref_train)


class TrainingJob:
    """One QLoRA training run, as phases: setup -> build_trainer -> fit -> save -> summarize.

    Holds the paths and the typed settings (kiln.spec.TrainingSettings, typed at the script's
    door); each phase is short and leaves what the next one needs on the job.
    """

    def __init__(
        self,
        paths: TrainingPaths,
        settings: TrainingSettings,
        tokenize: TokenizeSettings,
        data_fingerprints: dict,
        experiment: str = "",
        threads: int | None = None,
        tracking: dict | None = None,
        spec: dict | None = None,
    ):
        self.t_start = time.perf_counter()
        self.s = settings
        self.s.check()  # rules between settings fail here, before anything loads
        self.settings = self.s.to_dict()  # what the run key and experiment.json record
        self.tokenize = tokenize
        self.paths = paths
        self.ckpt = Path(paths.ckpt_dir)
        self.data_fingerprints, self.experiment = data_fingerprints, experiment
        self.threads, self.tracking = threads, tracking or {}
        self.spec = spec or {}  # what made this adapter (kiln.experiment.Experiment.adapter_spec); saved beside it
        self.world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (torchrun)

    # ---- setup: backend, processes, resume point, model, data, batch sizes --------------------
    def setup(self) -> None:
        self.backend, self.reason = self._resolve_backend()
        log.info("backend: %s (%s)", self.backend, self.reason)
        # decided with the backend, before any loading: lm_head_loss: liger where it can't run fails at once
        self.head_loss, self.head_loss_reason = resolve_head_loss(
            self.s.lm_head_loss, self.backend, lean=not self.s.step_metrics
        )
        log.info("LM head + loss: %s (%s)", self.head_loss, self.head_loss_reason)
        self.gemms, self.gemms_reason = resolve_lora_gemms(self.s.lora_gemms, self.backend, self.s.lora_dropout)
        log.info("LoRA GEMMs: %s (%s)", self.gemms, self.gemms_reason)
        self.fused, self.fsdp = None, False  # fsdp: build_trainer says (training.parallel: fsdp)
        if self.backend == "unsloth":
            import unsloth  # noqa: F401  (patches transformers and TRL: must come before them, this process only)
        self.dtype = compute_dtype(self.s.compute_dtype)
        self.base_identity = json.loads((Path(self.paths.base_dir) / "identity.json").read_text())

        import datasets

        datasets.disable_caching()  # no cache-*.arrow files written into another rule's output
        import torch
        import transformers
        from transformers import AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        self.cuda = torch.cuda.is_available()
        self._join_processes()
        self._choose_resume_point()

        # Packed rows: the kernel that keeps their documents apart, chosen before the model loads
        self.attention = plan_attention(self.backend, self.cuda) if self.tokenize.packing else None
        if self.attention is not None:
            log.info("packed rows: attention %s (%s)", self.attention.kernel, self.attention.reason)
        transformers.set_seed(self.s.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths.base_dir)
        self.model, self.peft_config = self._load_model()
        if self.gemms == "fused":
            self.fused = install_fused_lora(self.model)
        self._load_data(datasets.load_from_disk(self.paths.tokenized_dir))
        self._size_batches()

    def _resolve_backend(self) -> tuple[str, str]:
        return resolve_backend(self.s.backend, processes=self.world)

    def _load_model(self):
        """(model, LoRA config or None): the base as the backend loads it for training."""
        attn = self.attention.attn_implementation if self.attention else None
        return load_for_training(self.backend, self.paths.base_dir, self.s, self.dtype, self.tokenize.max_seq_len, attn)

    def _join_processes(self) -> None:
        import torch

        self.state = None
        if self.world > 1:
            from accelerate import PartialState

            # Before the model loads: joins the process group and makes this process's GPU current
            # (cpu=True on a machine without CUDA: gloo, what the CPU tests run).
            self.state = PartialState(cpu=not self.cuda)
            if not self.cuda:
                # accelerate names the device "cpu:0", which torch.load can't map a checkpoint to
                # (Trainer loads the optimizer state onto args.device when resuming under DDP).
                self.state.device = torch.device("cpu")
        self.main = self.state is None or self.state.is_main_process

    def _choose_resume_point(self) -> None:
        key = run_key(self.data_fingerprints, self.base_identity, self.tokenize.to_dict(), self.settings, TRAINING_CODE)
        if self.state is None:
            self.resume = prepare_checkpoints(self.ckpt, key)
        else:
            with self.state.main_process_first():  # the main process sets stale checkpoints aside first
                self.resume = prepare_checkpoints(self.ckpt, key)
        self.start_step = int(Path(self.resume).name.split("-")[1]) if self.resume else 0

    def _load_data(self, data) -> None:
        columns = [c for c in ("input_ids", "assistant_masks", "seq_lengths") if c in data["train"].column_names]
        self.train_ds = data["train"].select_columns(columns)
        self.eval_ds = None
        if self.s.eval_steps and len(data["validation"]):
            n_eval = min(self.s.eval_samples, len(data["validation"]))
            self.eval_ds = data["validation"].select(range(n_eval)).select_columns(columns)
        elif self.s.eval_steps:
            log.warning(
                "training.eval_steps is %d but the validation split is empty (build.validation is 0, or the "
                "dataset is too small for it): no validation loss%s",
                self.s.eval_steps,
                ", and no early stopping" if self.s.early_stopping_patience > 0 else "",
            )
        self.packed = "seq_lengths" in columns
        if self.packed and self.attention is None:
            raise ValueError(
                f"{self.paths.tokenized_dir} holds packed rows (seq_lengths) but tokenize.packing is false for this run"
            )
        self.early = self.s.early_stopping_patience > 0 and self.eval_ds is not None

    def _size_batches(self) -> None:
        import torch

        micro, accum = split_batch(self.s.per_device_batch_size, self.s.gradient_accumulation_steps, self.world)
        self.probe = None
        if self.s.auto_micro_batch and self.cuda:
            effective, seq_len = micro * accum, self.tokenize.max_seq_len
            micro, accum, self.probe = auto_micro_batch(self.model, effective, seq_len, self.dtype)
            if self.state is not None:  # every process must step together: the smallest pick wins
                picks = torch.tensor([micro], device=self.state.device)
                torch.distributed.all_reduce(picks, op=torch.distributed.ReduceOp.MIN)
                micro, accum = int(picks.item()), micro * accum // int(picks.item())
            log.info("micro-batch %d x %d accumulation steps (effective batch kept): %s", micro, accum, self.probe)
        if self.world > 1:
            log.info(
                "%d processes x micro-batch %d x %d accumulation steps = effective batch %d (as configured)",
                self.world,
                micro,
                accum,
                self.world * micro * accum,
            )
        self.micro, self.accum = micro, accum

    # ---- build_trainer: TRL's SFTConfig and Kiln's SFTTrainer ----------------------------------
    def build_trainer(self) -> None:
        import torch
        from transformers import EarlyStoppingCallback

        s, world = self.s, self.world
        self.lean = not s.step_metrics
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.ckpt / "tensorboard")
        report_to = ["tensorboard"] + mlflow_setup(self.tracking, self.experiment)
        args = sft_args(self, report_to)
        # Packed rows: Kiln's padding-free collator, whatever TRL or Unsloth would choose (kiln.packing)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.collator = PackedCollator(pad, self.attention.extras) if self.packed else None
        if world == 1 and args.n_gpu > 1:
            # One process that sees several GPUs: Trainer would split each batch over them with
            # nn.DataParallel (which TRL refuses). The model sits on the current GPU; train there.
            # Several GPUs are used through training.num_gpus (DDP) instead.
            log.info(
                "%d GPUs visible to one process: training on %s only (set training.num_gpus for DDP)",
                args.n_gpu,
                args.device,
            )
            args._n_gpu = 1
        self.trainer = sft_trainer_class()(
            model=self.model,
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            processing_class=self.tokenizer,
            data_collator=self.collator,
            peft_config=self.peft_config,
            adapter_dtype=self.dtype if self.dtype == torch.float32 else None,
            lean=self.lean,
            head_loss=liger_sum_loss() if self.head_loss == "liger" else None,
            callbacks=([step_logger(self.ckpt / STEP_LOG, self.start_step)] if self.main else [])
            + ([EarlyStoppingCallback(s.early_stopping_patience)] if self.early else []),
        )
        self.fsdp = enable_fsdp(self.trainer, s.parallel, world, self.dtype)
        self.isolation = None
        if self.packed:  # before any step: never a silent contaminated run
            vocab = self.trainer.model.get_input_embeddings().weight.shape[0]
            self.isolation = check_isolation(self.trainer.model, self.collator, vocab, s.seed)
            log.info("packed documents are isolated: %s", self.isolation)

    # ---- fit: the optimisation (resumed where a checkpoint says) -------------------------------
    def fit(self) -> None:
        if self.resume and self.start_step >= self.s.max_steps:
            self.result = self._finished_at_checkpoint()
        else:
            self.result = self.trainer.train(resume_from_checkpoint=self.resume)
        self.peaks = [peak_memory_mb()]
        self.full_state = gathered_state(self.trainer) if self.fsdp else None  # FSDP: for save(), all processes
        if self.state is not None:
            from accelerate.utils import gather_object

            self.peaks = gather_object(self.peaks)  # every process's peak, in rank order

    def _finished_at_checkpoint(self):
        """The newest complete checkpoint is the last step: training was done when the run was
        killed (before the adapter was saved). Transformers' resume would train one step past
        max_steps (its loop checks the limit after a step; the kill campaign found checkpoint-5 of
        a 4-step run), so the checkpoint's adapter and state are loaded and nothing is trained."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        resume = Path(self.resume)
        log.info(
            "%s is step %d of %d: training was complete; its adapter is saved",
            resume,
            self.start_step,
            self.s.max_steps,
        )
        self.trainer._load_from_checkpoint(str(resume))
        self.trainer.state = state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        if self.main:
            step_log = self.ckpt / STEP_LOG
            rows = [json.loads(ln) for ln in step_log.read_text().splitlines()] if step_log.exists() else []
            if not any("total_flos" in r for r in rows):  # the kill came before training's last line
                end = {"step": state.global_step, "time": round(time.time(), 3), "epoch": state.epoch}
                end |= {"num_input_tokens_seen": state.num_input_tokens_seen, "resumed_from": self.start_step}
                with open(step_log, "a") as fh:
                    fh.write(json.dumps(end) + "\n")
        return TrainOutput(state.global_step, math.nan, {})

    # ---- save: adapter, resolved settings beside it, step log, loss plot (main process) --------
    def save(self) -> None:
        adapter = Path(self.paths.adapter_dir)
        # PEFT records the base path it was given (here relative to the run's folder), and
        # `AutoPeftModelForCausalLM.from_pretrained(adapter)` resolves it against the caller's
        # working directory: from anywhere else it failed with "Repo id must be in the form ...".
        # The absolute path loads from any directory (Kiln itself uses `base_model_relpath`).
        for peft_config in getattr(self.trainer.model, "peft_config", {}).values():
            peft_config.base_model_name_or_path = str(Path(self.paths.base_dir).resolve())
        self.trainer.model.save_pretrained(adapter, safe_serialization=True, state_dict=self.full_state)
        self.tokenizer.save_pretrained(adapter)
        self.trained = TrainedAdapter(
            experiment=self.experiment,
            dataset=self.spec.get("dataset"),
            model=self.spec.get("model"),
            base_model_dir=str(Path(self.paths.base_dir)),
            base_model_relpath=os.path.relpath(self.paths.base_dir, self.paths.adapter_dir),
            base_identity=self.base_identity,
            backend=self.backend,
            backend_reason=self.reason,
            compute_dtype=str(self.dtype).removeprefix("torch."),
            quantization=self.s.quantization,
            training=self.s,
            tokenize=self.tokenize,
            data_fingerprints=self.data_fingerprints,
        )
        self.trained.write(adapter)
        shutil.copyfile(self.ckpt / STEP_LOG, self.paths.step_log_out)
        title = f"{self.experiment or 'training'}: {self.backend}, {self.trained.compute_dtype}"
        plot_loss(Path(self.paths.step_log_out), Path(self.paths.loss_png), title)

    # ---- summarize: what the run did, for the manifest and the comparison ----------------------
    def summarize(self) -> dict:
        import torch

        from kiln.provenance import hardware, package_versions

        trainer, lean, world = self.trainer, self.lean, self.world
        history = [json.loads(ln) for ln in Path(self.paths.step_log_out).read_text().splitlines()]
        losses = [r["loss"] for r in history if "loss" in r]
        summary = {
            "backend": self.backend,
            "backend_reason": self.reason,
            "compute_dtype": self.trained.compute_dtype,
            "steps": trainer.state.global_step,
            "resumed_from_step": self.start_step,
            "tokens_trained": int(trainer.state.num_input_tokens_seen)
            if not lean
            else estimated_tokens(self.train_ds, trainer.state.epoch or 0.0),
            "tokens_trained_estimated": lean,
            "processes": world,
            "parallel": ("fsdp" if self.fsdp else "ddp") if world > 1 else None,
            "micro_batch": self.micro,
            "gradient_accumulation_steps": self.accum,
            "effective_batch": world * self.micro * self.accum,
            "micro_batch_probe": self.probe,
            "attention": None
            if self.attention is None
            else {**self.attention.to_dict(), "isolation": self.isolation, "varlen_calls": varlen_calls()},
            "lm_head_loss": self.head_loss,
            "lm_head_loss_reason": self.head_loss_reason,
            "lora_gemms": self.gemms,
            "lora_gemms_reason": self.gemms_reason,
            "lora_gemms_fused": self.fused,  # per kind, the decoder layers whose projections were fused
            "wall_time_s": round(time.perf_counter() - self.t_start, 1),
            "train_runtime_s": round(self.result.metrics["train_runtime"], 1) if self.result.metrics else None,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "eval_loss": [r["eval_loss"] for r in history if "eval_loss" in r],
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "peak_memory": self.peaks[0],
            "peak_memory_per_process": self.peaks if world > 1 else None,
            "device": "cuda" if self.cuda else "cpu",
            "torch_threads": torch.get_num_threads(),
            "hardware": hardware(),
            "packages": package_versions(),  # of the environment training really ran in
        }
        if not losses or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"training loss is missing or not finite: {losses[-5:]}")
        Path(self.paths.summary_path).write_text(json.dumps(summary, indent=2))
        log.info(
            "trained %s steps, loss %.4f -> %.4f, %s tokens in %.0f s",
            summary["steps"],
            summary["first_loss"],
            summary["final_loss"],
            summary["tokens_trained"],
            summary["wall_time_s"],
        )
        return summary


def train(*args, **kwargs) -> dict:
    """The training recipe (TrainingJob's phases in order); the summary, or {} on a non-main process."""
    return run_job(TrainingJob(*args, **kwargs))


def run_job(job: TrainingJob) -> dict:
    """A job's phases in order (kiln.pref_train.train_preference runs its own job through here)."""
    job.setup()
    job.build_trainer()
    job.fit()
    if not job.main:
        return {}
    job.save()
    return job.summarize()
