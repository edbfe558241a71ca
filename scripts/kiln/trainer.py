"""TRL's SFTConfig from Kiln's settings, and its SFTTrainer with Kiln's corrections.

The corrections: adapter dtype, a loss that runs without Triton, and checkpoints that are recorded
complete before older ones are rotated away (kiln.checkpoints).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from kiln.checkpoints import mark_complete


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


def takes_logits_to_keep(model) -> bool:
    """Whether the model (or, under PEFT, the model it wraps) takes Transformers' ``logits_to_keep``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def summed_nll(logits, target):
    """The summed negative log-likelihood of the labelled targets (-100: not scored), from float32
    logits, and how many were scored: (tensor, tensor)."""
    import torch

    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, (target != -100).sum()


def _per_token(total, scored, num_items_in_batch=None):
    """A summed loss over ``num_items_in_batch`` (the whole accumulated batch's count) where given,
    else over the tokens this batch scored."""
    import torch

    count = num_items_in_batch if num_items_in_batch is not None else scored
    return total / (count.to(total.device) if torch.is_tensor(count) else count)


def labelled_positions_loss(model, inputs: dict, num_items_in_batch=None):
    """The causal-LM loss with the LM head applied only at positions whose next token is labelled.

    Kiln trains on the answer tokens (assistant_only_loss): 59 of 139 tokens a row on the default
    task. The model's own loss projects every position onto the vocabulary (49,152 wide for
    SmolLM2, 151,936 for Qwen) and takes a log-softmax over all of them; on the 2-core CPU that
    was a sixth of a training step (the LM head's matmuls and the log-softmax backward, measured
    with torch.profiler). Transformers' ``logits_to_keep`` (positions, one set for the batch: the
    union over its rows) keeps the rest from being computed; the loss is the same quantity (sum of
    the labelled tokens' negative log-likelihoods over ``num_items_in_batch``, or their mean).
    Liger's fused linear cross-entropy does this chunked, but in Triton (GPU only).

    Returns (None, None) when nearly every position is labelled: the plain path is as fast."""

    labels = inputs.get("labels")
    if labels is None:
        return None, None
    shift = labels[:, 1:]
    keep = (shift != -100).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0 or keep.numel() > 0.9 * shift.shape[1]:
        return None, None
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    total, scored = summed_nll(outputs.logits, shift[:, keep].to(outputs.logits.device))
    return _per_token(total, scored, num_items_in_batch), outputs


def liger_head_loss_available() -> tuple[bool, str]:
    """Whether Liger's fused linear cross-entropy can run here: (yes/no, why)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (Liger's kernels are Triton, GPU only)"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed (pip install -e '.[gpu]')"
    return True, "CUDA device and liger-kernel installed"


def hidden_states_then_head_loss(model, inputs: dict, num_items_in_batch=None, head_loss=None):
    """The causal-LM loss from the final hidden states at labelled positions, the LM head and the
    cross-entropy fused: the 151,936-wide logits of a Qwen batch never exist whole.

    Unsloth returns its final-norm hidden states in place of logits under
    ``UNSLOTH_RETURN_HIDDEN_STATES=1`` (read at each forward; set only around this call). Only the
    positions whose next token is labelled are kept (prompt tokens and, in packed batches, the
    sequence boundaries TRL's collator masks cost no LM-head work); ``head_loss(weight, hidden,
    target)`` returns the summed negative log-likelihood: Liger's fused linear cross-entropy on the
    GPU (1.03x the tokens/s of Unsloth's own fused loss in Kiln's stage at Qwen2.5-0.5B shape, loss
    curves within 2e-6 relative, H200: benchmarks/results/train_gpu_levers_h200), or any function
    of the same contract (the tests pass a plain PyTorch one). Same quantity as the model's loss:
    the sum over labelled tokens over ``num_items_in_batch`` (the count over the whole accumulated
    batch), or their mean."""
    import os

    labels = inputs["labels"]
    before = os.environ.get("UNSLOTH_RETURN_HIDDEN_STATES")
    os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] = "1"
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        if before is None:
            os.environ.pop("UNSLOTH_RETURN_HIDDEN_STATES", None)
        else:
            os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] = before
    hidden = outputs.logits  # (batch, seq, hidden) under that variable
    shift = labels[:, 1:].to(hidden.device)
    keep = shift != -100
    weight = model.get_output_embeddings().weight
    # In the weight's dtype: under bf16 mixed precision accelerate returns every output in float32
    # (convert_outputs_to_fp32), and the head then ran as a float32 matmul: Kiln's stage at 0.43x
    # the plain loop on an H200 (benchmarks/results/train_gpu_levers_h200). The values came from
    # bf16, so the cast back is exact.
    h = hidden[:, :-1, :][keep].to(weight.dtype)
    return _per_token(head_loss(weight, h, shift[keep]), keep.sum(), num_items_in_batch), outputs


def resolve_head_loss(choice: str, backend: str, lean: bool) -> tuple[str, str]:
    """training.lm_head_loss resolved for this run: ("liger" or "model", why)."""
    if choice == "model":
        return "model", "training.lm_head_loss: model"
    where = []
    if backend != "unsloth":
        where.append(f"the backend is {backend} (the hidden states come from Unsloth's forward)")
    if not lean:
        where.append("step_metrics is true (TRL computes its loss with its per-step metrics)")
    ok, why = liger_head_loss_available()
    if not ok:
        where.append(why)
    if not where:
        return "liger", "Unsloth on a CUDA card, lean step, liger-kernel installed"
    if choice == "liger":
        raise ValueError(
            "training.lm_head_loss: liger can't run here: " + "; ".join(where) + " (set it to auto or model)"
        )
    return "model", "the model's own loss: " + "; ".join(where)


@functools.cache
def liger_sum_loss():
    """Liger's fused linear cross-entropy, summed (Kiln divides by the token count itself)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


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
            # the lean step (kiln.trainer.hidden_states_then_head_loss), or None: the model's own
            self.kiln_head_loss = head_loss
            # PEFT resolves `all-linear` into a set of module names and saves it as list(set): hash
            # order, so two identical runs wrote different adapter_config.json bytes (the kill
            # campaign's content-hash comparison found it). A sorted list means the same modules.
            for config in getattr(self.model, "peft_config", {}).values():
                if isinstance(getattr(config, "target_modules", None), set):
                    config.target_modules = sorted(config.target_modules)
            # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first time the
            # layer runs in eval mode without grad (the evaluation at eval_steps), and the training
            # forwards after it use that kernel: different rounding (losses 2.5e-6 apart). A run
            # resumed from the checkpoint saved at that evaluation then trained on the unpacked
            # kernel, so its adapter differed from the uninterrupted run's (the kill campaign found
            # it). Training keeps one kernel throughout; a resume is then bit-identical.
            for module in self.model.modules():
                if getattr(module, "support_avx512bf16_for_cpu", False):
                    module.support_avx512bf16_for_cpu = False
            # Transformers' progress bar prints each log as a dict of strings ({'loss': '0.1096',
            # ...}); Kiln's prints one readable line with numbers (the step log keeps them all).
            from transformers.trainer_callback import ProgressCallback

            if self.pop_callback(ProgressCallback) is not None:
                self.add_callback(_readable_progress())
            # The LM head only where a label is (kiln.trainer.labelled_positions_loss), where the
            # model takes `logits_to_keep` (Unsloth's path has its own fused loss).
            self.kiln_answer_positions = takes_logits_to_keep(self.accelerator.unwrap_model(self.model))
            if adapter_dtype is not None:
                for param in self.model.parameters():
                    if param.requires_grad and param.dtype != adapter_dtype:
                        param.data = param.data.to(adapter_dtype)

        def create_model_card(self, *args, **kwargs):
            """Not written. TRL writes README.md into the checkpoint folder before every save: a card
            for "a fine-tuned version of [None]" with a Hub snippet for a model that is not on the
            Hub, its tags in set (hash) order, so two identical runs differed (the kill campaign
            found it). The checkpoint folder is Kiln's working state; the published model has
            Kiln's own card."""

        def _save_checkpoint(self, model, trial):
            """Transformers' save, then Kiln's completion record, then rotation of old checkpoints.

            Rotation waits until the new checkpoint is recorded complete, so a kill at any moment
            leaves at least one complete checkpoint behind (kiln.checkpoints).
            """
            import torch.distributed as dist
            from transformers.trainer_utils import rotate_checkpoints

            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every process has written its files (its RNG state)
            if self.args.should_save:
                run_dir = Path(self._get_output_dir(trial=trial))
                mark_complete(run_dir / f"checkpoint-{self.state.global_step}", self.state.global_step)
                rotate_checkpoints(str(run_dir), limit, self.state.best_model_checkpoint, use_mtime=True)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Kiln's own losses (below) are normalised as Trainer.compute_loss normalises: by
            # num_items_in_batch only where the model takes loss kwargs (otherwise Trainer divides
            # by the accumulation steps itself and expects a mean per micro-batch).
            n = num_items_in_batch if self.model_accepts_loss_kwargs else None
            # No cache in training: with one, transformers skips the packed-sequence detection that
            # keeps padding-free documents apart (a packed row's logits moved by 3.5 on a CPU).
            inputs = {**inputs, "use_cache": False}
            loss = None
            if self.kiln_lean and self.kiln_head_loss is not None and "labels" in inputs:
                loss, outputs = hidden_states_then_head_loss(model, inputs, n, self.kiln_head_loss)
            elif self.kiln_lean:
                # The model's own loss (Unsloth's fused cross-entropy on its path), without TRL's
                # per-step entropy / token-accuracy metrics and their host syncs.
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            elif _fused_loss_available():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            elif self.kiln_answer_positions and self.compute_loss_func is None and self.label_smoother is None:
                loss, outputs = labelled_positions_loss(model, inputs, n)
            if loss is None:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and n is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales it
            return (loss, outputs) if return_outputs else loss

    return KilnSFTTrainer


def sft_args(job, report_to: list[str]):
    """TRL's SFTConfig for a kiln.train.TrainingJob after its setup phase (settings, batch sizes, data)."""
    import torch
    from trl import SFTConfig

    s, world, cuda = job.s, job.world, job.cuda
    return SFTConfig(
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
    )
