"""TRL's SFTConfig from Kiln's settings, and its SFTTrainer with Kiln's corrections.

The corrections: adapter dtype, a loss that runs without Triton, and checkpoints that are recorded
complete before older ones are rotated away (kiln.checkpoints).
"""

from __future__ import annotations

import functools
from pathlib import Path

from kiln.checkpoints import mark_complete
from kiln.losses import hidden_states_then_head_loss, labelled_positions_loss, takes_logits_to_keep
from kiln.parallel import fsdp_args


def _fused_loss_available() -> bool:
    from trl.trainer import utils as trl_utils

    return getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None


# Per-step keys shown on the console, in order, with their labels; the rest stay in the step log.
SHOWN = {
    "loss": "loss",
    "eval_loss": "eval loss",
    "grad_norm": "grad norm",
    "learning_rate": "lr",
    "train_tokens_per_second": "tokens/s",
}


def readable_log(logs: dict, step: int, max_steps: int) -> str:
    """One console line for a training log: `step 7/56  loss 0.1096  grad norm 0.394  lr 0.0002976`."""
    parts = [f"step {step}/{max_steps}"]
    for key, name in SHOWN.items():
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{name} {value:.4g}")
    return "  ".join(parts)


def _readable_progress():
    from transformers.trainer_callback import ProgressCallback

    class ReadableProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                if any(k in logs for k in SHOWN):
                    self.training_bar.write(readable_log(logs, state.global_step, state.max_steps))

    return ReadableProgress()


def _use_readable_progress(trainer) -> None:
    """Transformers' progress bar prints each log as a dict of strings ({'loss': '0.1096', ...});
    Kiln's prints one readable line with numbers (the step log keeps them all)."""
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_readable_progress())


def _deterministic_target_modules(model) -> None:
    """PEFT resolves `all-linear` into a set of module names and saves it as list(set): hash order,
    so two identical runs wrote different adapter_config.json bytes (the kill campaign's
    content-hash comparison found it). A sorted list means the same modules."""
    for config in getattr(model, "peft_config", {}).values():
        if isinstance(getattr(config, "target_modules", None), set):
            config.target_modules = sorted(config.target_modules)


def _one_cpu_kernel(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first time the layer
    runs in eval mode without grad (the evaluation at eval_steps), and the training forwards after
    it use that kernel: different rounding (losses 2.5e-6 apart). A run resumed from the checkpoint
    saved at that evaluation then trained on the unpacked kernel, so its adapter differed from the
    uninterrupted run's (the kill campaign found it). Training keeps one kernel throughout; a
    resume is then bit-identical."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _cast_adapters(model, dtype) -> None:
    """TRL casts QLoRA adapter weights to bfloat16 whatever the compute dtype: back to ``dtype``."""
    if dtype is None:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _save_recorded_then_rotate(trainer, save, model, trial) -> None:
    """Transformers' save (``save``), then Kiln's completion record, then rotation of old
    checkpoints. Rotation waits until the new checkpoint is recorded complete, so a kill at any
    moment leaves at least one complete checkpoint behind (kiln.checkpoints)."""
    import torch.distributed as dist
    from transformers.trainer_utils import rotate_checkpoints

    limit = trainer.args.save_total_limit
    trainer.args.save_total_limit = None
    try:
        save(model, trial)
    finally:
        trainer.args.save_total_limit = limit
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every process has written its files (its RNG state)
    if trainer.args.should_save:
        run_dir = Path(trainer._get_output_dir(trial=trial))
        mark_complete(run_dir / f"checkpoint-{trainer.state.global_step}", trainer.state.global_step)
        rotate_checkpoints(str(run_dir), limit, trainer.state.best_model_checkpoint, use_mtime=True)


def _kiln_loss(trainer, model, inputs: dict, n):
    """Kiln's own loss for this step, or (None, None) where the trainer's is used. Normalised as
    Trainer.compute_loss normalises: by ``n`` (num_items_in_batch) only where the model takes loss
    kwargs (otherwise Trainer divides by the accumulation steps itself and expects a mean per
    micro-batch)."""
    if trainer.kiln_lean and trainer.kiln_head_loss is not None and "labels" in inputs:
        return hidden_states_then_head_loss(model, inputs, n, trainer.kiln_head_loss)
    if trainer.kiln_lean or _fused_loss_available():
        return None, None
    if trainer.kiln_answer_positions and trainer.compute_loss_func is None and trainer.label_smoother is None:
        return labelled_positions_loss(model, inputs, n)
    return None, None


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer, with a loss that also runs where TRL's fused LM-head kernel can't."""
    from transformers import Trainer
    from trl import SFTTrainer

    class KilnSFTTrainer(SFTTrainer):
        """Corrections to TRL 1.15 for the CPU path, and a deterministic adapter config.

        - TRL casts QLoRA adapter weights to bfloat16 whatever the compute dtype. With float32
          compute on a CPU that made every LoRA matmul a slow bf16 one (2x the step time) and is
          where the bf16 divergence came from; ``adapter_dtype`` casts them back.
        - TRL computes the loss with a chunked LM-head kernel written in Triton; without Triton (a
          CPU machine) the kernel is missing and training crashes. The model's own causal-LM loss
          on the same labels is the same quantity, so it is used there.
        """

        def __init__(self, *args, adapter_dtype=None, lean=False, head_loss=None, **kwargs):
            super().__init__(*args, **kwargs)
            # A collator Kiln passes (packed rows: kiln.packing.PackedCollator) is the one batches
            # come through, whatever a patched trainer (Unsloth's) put in its place.
            if kwargs.get("data_collator") is not None:
                self.data_collator = kwargs["data_collator"]
            self.kiln_lean = lean
            # training.lm_head_loss resolved: a (weight, hidden, target) -> summed NLL function for
            # the lean step (kiln.losses.hidden_states_then_head_loss), or None: the model's own
            self.kiln_head_loss = head_loss
            _deterministic_target_modules(self.model)
            _one_cpu_kernel(self.model)
            _use_readable_progress(self)
            # The LM head only where a label is (kiln.losses.labelled_positions_loss), where the
            # model takes `logits_to_keep` (Unsloth's path has its own fused loss).
            self.kiln_answer_positions = takes_logits_to_keep(self.accelerator.unwrap_model(self.model))
            _cast_adapters(self.model, adapter_dtype)

        def create_model_card(self, *args, **kwargs):
            """Not written. TRL writes README.md into the checkpoint folder before every save: a card
            for "a fine-tuned version of [None]" with a Hub snippet for a model that is not on the
            Hub, its tags in set (hash) order, so two identical runs differed (the kill campaign
            found it). The checkpoint folder is Kiln's working state; the published model has
            Kiln's own card."""

        def _save_checkpoint(self, model, trial):
            _save_recorded_then_rotate(self, super()._save_checkpoint, model, trial)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n = num_items_in_batch if self.model_accepts_loss_kwargs else None
            # No cache in training: with one, transformers skips the packed-sequence detection that
            # keeps padding-free documents apart (a packed row's logits moved by 3.5 on a CPU).
            inputs = {**inputs, "use_cache": False}
            if not self.kiln_lean and _fused_loss_available():  # TRL's own fused LM-head loss
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = _kiln_loss(self, model, inputs, n)
            if loss is None:
                # The model's own loss (on the lean step: Unsloth's fused cross-entropy, without
                # TRL's per-step entropy / token-accuracy metrics and their host syncs).
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and n is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales it
            return (loss, outputs) if return_outputs else loss

    return KilnSFTTrainer


def schedule_args(job) -> dict:
    """The TrainingArguments every Kiln trainer shares (SFTConfig here, DPOConfig in kiln.dpo): steps,
    batch sizes, optimiser schedule, checkpoints and validation, from a job after its setup phase."""
    s = job.s
    return dict(
        output_dir=str(job.ckpt),
        max_steps=s.max_steps,
        per_device_train_batch_size=job.micro,
        per_device_eval_batch_size=job.micro,
        gradient_accumulation_steps=job.accum,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        eval_strategy="steps" if job.eval_ds is not None else "no",
        eval_steps=s.eval_steps or None,
    )


class PreferenceCorrections:
    """Kiln's corrections for TRL's preference trainers, mixed in before one (kiln.dpo, kiln.kto,
    kiln.orpo: ``class KilnDPOTrainer(PreferenceCorrections, DPOTrainer)``): the adapter's dtype
    (``adapter_dtype``), one CPU kernel for 4-bit layers, sorted target modules, the readable
    progress line, checkpoints recorded complete before rotation and no TRL model card in the
    checkpoint folder, each as KilnSFTTrainer has it and says why."""

    def __init__(self, *args, adapter_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        _deterministic_target_modules(self.model)
        _one_cpu_kernel(self.model)
        _use_readable_progress(self)
        _cast_adapters(self.model, adapter_dtype)

    def create_model_card(self, *args, **kwargs):
        """Not written (KilnSFTTrainer.create_model_card says why)."""

    def _save_checkpoint(self, model, trial):
        _save_recorded_then_rotate(self, super()._save_checkpoint, model, trial)


def preference_args(job, report_to: list[str]) -> dict:
    """The config arguments TRL's DPOConfig, KTOConfig and ORPOConfig take alike, for a
    kiln.pref_train.PreferenceJob after its setup phase: schedule_args and the run's dtype, device,
    seed, sequence length, beta and logging. Each method's config adds its own."""
    import torch

    s = job.s
    return dict(
        **schedule_args(job),
        prediction_loss_only=True,
        seed=s.seed,
        data_seed=s.seed,
        bf16=job.dtype == torch.bfloat16,
        fp16=job.dtype == torch.float16,
        use_cpu=not job.cuda,
        max_length=job.tokenize.max_seq_len,
        beta=s.beta,
        include_num_input_tokens_seen=True,
        report_to=report_to,
        run_name=job.experiment,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def sft_args(job, report_to: list[str]):
    """TRL's SFTConfig for a kiln.train.TrainingJob after its setup phase (settings, batch sizes, data)."""
    import torch
    from trl import SFTConfig

    s, world, cuda = job.s, job.world, job.cuda
    return SFTConfig(
        **schedule_args(job),
        # Validation is scored by its loss: the logits are not gathered (32 rows x 49,152 floats a
        # position was a gigabyte held across the evaluation).
        prediction_loss_only=True,
        load_best_model_at_end=job.early,
        metric_for_best_model="eval_loss" if job.early else None,
        greater_is_better=False if job.early else None,
        seed=s.seed,
        data_seed=s.seed,
        bf16=job.dtype == torch.bfloat16,
        fp16=job.dtype == torch.float16,
        use_cpu=not cuda,
        # Packed rows are already at most max_seq_len; they go to the model through Kiln's own
        # padding-free collator (kiln.packing), so TRL's padding_free stays off (it refuses a collator).
        max_length=None if job.packed else job.tokenize.max_seq_len,
        packing=False,
        padding_free=False,
        # Counting tokens costs a host sync every step; the lean step estimates them from the data.
        include_num_input_tokens_seen="no" if job.lean else True,
        report_to=report_to,
        run_name=job.experiment,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        dataset_num_proc=None,
        disable_tqdm=False,
        # DDP: every LoRA weight gets a gradient each step; reentrant checkpointing breaks DDP hooks.
        ddp_find_unused_parameters=False if world > 1 else None,
        gradient_checkpointing_kwargs={"use_reentrant": False} if world > 1 else None,
        # CPU DDP: keep the process state made above (its plain "cpu" device, see there).
        accelerator_config={"use_configured_state": True} if world > 1 and not cuda else None,
        **fsdp_args(job.s.parallel, world),
    )
