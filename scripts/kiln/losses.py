"""The training losses Kiln computes itself, each the same quantity as the model's own causal-LM
loss (the summed negative log-likelihood of the labelled tokens over their count), computed with
less work: the LM head only at labelled positions (CPU), or fused with the cross-entropy from the
final hidden states (Liger, GPU). kiln.trainer's SFTTrainer picks among them; evaluation's model
passes use the same sums."""

from __future__ import annotations

import functools
import inspect


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
