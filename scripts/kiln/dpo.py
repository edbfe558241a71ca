"""Direct preference optimisation with TRL's DPOTrainer (issue 27): tokens of pairs, the trainer
with Kiln's corrections, and its config.

Tokens (kiln.pair_tokens): the tokenize stage turns each pair into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``
the way TRL's ``DPOTrainer._prepare_dataset`` does (the chat template's generation prompt for the
prompt, the whole conversation for each answer, the completion starting where the two token lists
diverge); tests/test_dpo.py holds the two to the same ids. Done in the cached, audited stage rather
than at trainer start, so the tokens, their counts and truncation are in the tokenize stats and
evaluation scores the very ids training saw.

Reference: TRL copies the SFT adapter the policy starts from into a frozen adapter ``ref`` and
scores the reference with it (``use_adapter(model, "ref")`` in ``compute_ref_log_probs``): the
reference is the SFT model exactly, with no second copy of the base weights.

CPU: TRL's DPO loss projects hidden states through the LM head with a chunked Triton kernel
(``_ChunkedLogProbFunction``), which a CPU machine does not have (no Triton). ``PlainChunkedLogProb``
computes the same per-token quantities with torch's ops, token chunk by token chunk, and is put in
its place only where the kernel is missing.
"""

from __future__ import annotations

import functools
import logging

from kiln.pair_tokens import PAIR_COLUMNS

log = logging.getLogger(__name__)


class PlainChunkedLogProb:
    """TRL's ``_ChunkedLogProbFunction`` in plain torch (autograd does the backward): per-token
    log-probability of each target and the optional extras, LM head applied a chunk of tokens at a time."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, *rest):
        """TRL's positional call: ``rest`` is (chunk_size, final_logit_softcapping, logit_scale, outputs)."""
        import torch

        _, softcap, logit_scale, outputs = (*rest, *(None, None, 1.0, ())[len(rest) :])

        parts: dict[str, list] = {k: [] for k in ("log_probs", *outputs)}
        step = max(1, 1024 * 1024 * 64 // max(1, weight.shape[0] * 4))  # ~64 MiB of float32 logits a chunk
        for a in range(0, hidden.shape[0], step):
            z = torch.nn.functional.linear(hidden[a : a + step], weight, bias).float() * logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            z = z / temperature
            logp = torch.log_softmax(z, dim=-1)
            t = targets[a : a + step]
            parts["log_probs"].append(logp.gather(-1, t[:, None]).squeeze(-1))
            if "entropy" in outputs:
                parts["entropy"].append(-(logp.exp() * logp).sum(-1))
            if "log_sum_sq_probs" in outputs:
                parts["log_sum_sq_probs"].append(torch.logsumexp(2 * logp, dim=-1).detach())
            if "mean_logits" in outputs:
                parts["mean_logits"].append(z.mean(-1).detach())
            if "is_top1" in outputs:
                parts["is_top1"].append((z.argmax(-1) == t).detach())
        joined = {k: torch.cat(v) if v else hidden.new_zeros(0) for k, v in parts.items()}
        return tuple(joined.get(k) for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))


def ensure_logprob_kernel() -> str:
    """TRL's Triton kernel where it is importable, else the plain one; says which."""
    from trl.trainer import utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is None:
        trl_utils._ChunkedLogProbFunction = PlainChunkedLogProb
        return "plain torch (no Triton on this machine: kiln.dpo.PlainChunkedLogProb)"
    if trl_utils._ChunkedLogProbFunction is PlainChunkedLogProb:
        return "plain torch (no Triton on this machine: kiln.dpo.PlainChunkedLogProb)"
    return "TRL's chunked Triton kernel"


def load_policy(base_model, sft_adapter: str):
    """The SFT adapter on the base, trainable: the policy. TRL's DPOTrainer copies it into the frozen
    adapter ``ref`` when it is given a PEFT model with no ref_model (trl 1.15 dpo_trainer.py)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, sft_adapter, is_trainable=True)


def resume_policy(model, checkpoint: str) -> None:
    """Resume the policy from a checkpoint, leaving the reference alone.

    A DPO checkpoint holds two adapters: the policy (``default``, at the folder's root) and TRL's
    frozen reference (``ref/``). Transformers' ``Trainer._load_from_checkpoint`` sees the ``ref``
    subfolder and then loads *only* the subfolders (transformers 5.17, trainer.py): the policy
    stayed at the SFT adapter while the optimizer and the schedule resumed at the checkpoint's
    step, so a killed DPO run silently lost its first steps (found by tests/test_dpo.py's kill
    test). Here the policy is loaded from the root; the reference stays the copy TRL made of the SFT
    adapter at start (the true reference, whatever a checkpoint holds)."""
    from pathlib import Path

    active = model.active_adapters[0]
    if not (Path(checkpoint) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors (the policy) to resume from")
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    model.load_adapter(checkpoint, active, is_trainable=True)
    model.set_adapter(active)
    for name, param in model.named_parameters():  # the adapter's dtype as training set it (adapter_dtype)
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


@functools.cache
def dpo_trainer_class():
    """TRL's DPOTrainer with Kiln's corrections (kiln.trainer.PreferenceCorrections), on pre-tokenized pairs."""
    from trl import DPOTrainer

    from kiln.trainer import PreferenceCorrections

    class KilnDPOTrainer(PreferenceCorrections, DPOTrainer):
        """- pairs arrive tokenized by Kiln's tokenize stage (``_prepare_dataset`` passes them on);
        - the policy resumes from the checkpoint's root (``resume_policy``);
        - TRL casts QLoRA adapters to bfloat16 whatever the compute dtype (``adapter_dtype`` undoes it),
          and the rest of PreferenceCorrections."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if all(c in dataset.column_names for c in PAIR_COLUMNS):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            resume_policy(model or self.model, resume_from_checkpoint)

    return KilnDPOTrainer


def dpo_args(job, report_to: list[str]):
    """TRL's DPOConfig for a kiln.pref_train.PreferenceJob after its setup phase."""
    from trl import DPOConfig

    from kiln.trainer import preference_args

    s = job.s
    return DPOConfig(
        **preference_args(job, report_to),
        # RPO: the preference loss plus TRL's sft loss on the chosen answer, weighted (training.sft_weight)
        loss_type=[s.loss_type, "sft"] if s.sft_weight else [s.loss_type],
        loss_weights=[1.0, s.sft_weight] if s.sft_weight else None,
        label_smoothing=s.label_smoothing,
    )
