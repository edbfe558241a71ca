"""Packed rows that never see each other: the padding-free collator, the attention kernel that keeps
the documents of a packed row apart, and a check on the model about to train that it does.

Kiln's tokenize stage packs rows best-fit into ``max_seq_len`` sequences (TRL's ``pack_dataset``,
a ``seq_lengths`` column). A packed row is only correct if each document attends to itself alone.
TRL and Unsloth each decide for themselves whether a batch goes to the model padding-free: Unsloth's
SFTTrainer turned it off for Kiln's pre-tokenized data ("cannot enforce a max_length"), and every
2048-token row then trained as one causal sequence, each document attending to the ones packed
before it. So Kiln passes its own collator and sees that the trainer keeps it:

- ``PackedCollator``: TRL's ``DataCollatorForLanguageModeling`` with ``padding_free=True`` (one
  [1, T] row, position ids reset per document, the label at each document's first token -100),
  plus the boundaries as the attention kernels read them: ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` (transformers' flash-attention kwargs) for the ``hf`` backend,
  ``packed_seq_lengths`` for Unsloth's.
- ``plan_attention``: which kernel keeps them apart, and why. On CUDA a varlen kernel (no T x T
  mask: a dense mask made a correct 64 x 2048 packed batch take 21 s a step on an H200); on a CPU
  transformers' SDPA with the block-diagonal mask it builds from the reset position ids.
- ``check_isolation``: before training, one document alone against the same document packed
  after another, through the model and collator that will train. Where they differ like a
  contaminated run, training stops with one line naming ``tokenize.packing``.

The varlen attention function is written here because transformers' own padding-free kernels are
flash-attn's (a CUDA package Kiln does not require); torch ships ``varlen_attn`` from 2.10 on.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

VARLEN = "kiln_varlen"  # the attention implementation name registered with transformers


class PackingError(RuntimeError):
    """Packed documents would attend to each other: tokenize.packing must be refused."""


@dataclass
class AttentionPlan:
    """How a packed batch's documents are kept apart: the kernel, why, and what the collator adds."""

    kernel: str
    reason: str
    extras: str  # "hf": cu_seq_lens / max_length kwargs; "unsloth": packed_seq_lengths
    attn_implementation: str | None = None  # what the hf backend loads the model with (None: its default)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the collator ------------------------------------------------------------------------------
class PackedCollator:
    """Packed rows -> one padding-free [1, T] batch whose documents are marked for the kernel.

    Rows without ``seq_lengths`` count as one document each (validation rows of an unpacked split).
    """

    def __init__(self, pad_token_id: int, extras: str = "hf"):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
        self.extras = extras

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        examples = [dict(e, seq_lengths=e.get("seq_lengths") or [len(e["input_ids"])]) for e in examples]
        batch = self.inner(examples)
        lengths = torch.tensor([n for e in examples for n in e["seq_lengths"] if n > 0], dtype=torch.int32)
        if self.extras == "unsloth":
            batch["packed_seq_lengths"] = lengths
        else:
            cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        return batch


# ---- the attention kernel ----------------------------------------------------------------------
def torch_varlen():
    """torch's ``varlen_attn`` behind one signature (q, k, v, cu, max_len, scale) -> out, or None.

    torch 2.10/2.11 take no ``enable_gqa``: grouped-query K and V are repeated to the query heads
    there (exact). Counts its calls (``calls``), so a run can show the kernel really ran."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def varlen(q, k, v, cu, max_len, scale=None):
        """q (T, H, D), k/v (T, H_kv, D), causal within each cu segment -> (T, H, D)."""
        groups = q.shape[1] // k.shape[1]
        kwargs = {"scale": scale}
        if groups > 1 and "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)  # causal
        else:
            kwargs["is_causal"] = True
        varlen.calls += 1
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)

    varlen.calls = 0
    return varlen


_VARLEN = None


def _boundaries(kwargs: dict, total: int, device):
    """(cu_seqlens int32, max length) of a [1, T] row: from the collator's kwargs, else from the
    reset position ids, else one document."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    positions = kwargs.get("position_ids")
    if positions is None:
        starts = torch.zeros(1, dtype=torch.int64, device=device)
    else:
        starts = (positions.reshape(-1) == 0).nonzero().squeeze(1).to(device)
    cu = torch.cat([starts, torch.tensor([total], device=device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface over torch's varlen kernel: a [1, T] padding-free row, each
    document causal on its own. Anything else (a padding mask, several rows, a CPU tensor, dropout)
    goes to transformers' SDPA as before."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[0] != 1 or not query.is_cuda or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    total = query.shape[2]
    cu, max_len = _boundaries(kwargs, total, query.device)
    # (1, H, T, D) -> (T, H, D); varlen takes 16-bit inputs (autocast leaves q/k/v in the compute dtype)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = _VARLEN(q, k, v, cu, max_len, scaling)
    return out.unsqueeze(0), None  # (1, T, H, D), as transformers' kernels return it


def _varlen_mask(*args, **kwargs):
    """No mask for the varlen kernel's case (one row, no padding mask); SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("batch_size") == 1 and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen() -> bool:
    """Register ``kiln_varlen`` with transformers (attention and mask); False where torch has no varlen."""
    global _VARLEN
    if _VARLEN is None:
        _VARLEN = torch_varlen()
    if _VARLEN is None:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return True


def varlen_calls() -> int | None:
    """How many attention calls went through Kiln's varlen kernel in this process (None: never set up)."""
    return None if _VARLEN is None else _VARLEN.calls


def plan_attention(backend: str, cuda: bool) -> AttentionPlan:
    """The kernel that keeps a packed batch's documents apart on this backend and machine."""
    import importlib.util

    if backend == "unsloth":
        return _plan_unsloth()
    if not cuda:
        return AttentionPlan(
            "sdpa, block-diagonal mask",
            "CPU: transformers builds the mask from the reset position ids (no varlen kernel on a CPU)",
            "hf",
        )
    if importlib.util.find_spec("flash_attn") is not None:
        why = "flash-attn is installed: transformers' own padding-free kernel"
        return AttentionPlan("flash_attention_2 (varlen)", why, "hf", "flash_attention_2")
    if register_varlen():
        return AttentionPlan(
            "torch varlen_attn", "CUDA: torch.nn.attention.varlen, no T x T mask (Kiln's kiln_varlen)", "hf", VARLEN
        )
    return AttentionPlan(
        "sdpa, block-diagonal mask",
        "CUDA but neither flash-attn nor torch.nn.attention.varlen (torch < 2.10): a dense T x T mask, slow",
        "hf",
    )


def _plan_unsloth() -> AttentionPlan:
    """Unsloth's own packed path (``packed_seq_lengths``): flash-attn varlen where installed, else
    torch's varlen, which Unsloth only takes from a torch whose ``varlen_attn`` has ``enable_gqa``
    (2.12): on 2.10/2.11 it would run SDPA once per run of equal-length documents. Kiln hands it
    the GQA-capable wrapper (``torch_varlen``) there."""
    global _VARLEN
    from unsloth.utils import attention_dispatch as dispatch

    if getattr(dispatch, "HAS_FLASH_ATTENTION", False):
        return AttentionPlan("unsloth: flash_attn varlen", "flash-attn is installed", "unsloth")
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
        return AttentionPlan("unsloth: torch varlen_attn", "Unsloth's own (torch has enable_gqa)", "unsloth")
    if _VARLEN is None:
        _VARLEN = torch_varlen()
    if _VARLEN is None:
        return AttentionPlan("unsloth: sdpa per document run", "torch has no varlen_attn (< 2.10): slow", "unsloth")

    def unsloth_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False):
        if tuple(window_size) != (-1, 0):
            raise PackingError(f"Kiln's varlen wrapper is causal only; Unsloth asked for window {window_size}")
        return _VARLEN(q, k, v, cu_q, max_q, scale)

    dispatch._TORCH_VARLEN_ATTN = unsloth_varlen
    return AttentionPlan(
        "unsloth: torch varlen_attn",
        "this torch's varlen_attn has no enable_gqa, which Unsloth asks for: Kiln's wrapper repeats K/V heads",
        "unsloth",
    )


def unpack_rows(rows):
    """A tokenized split as one row a document (input_ids, assistant_masks): packed rows
    (``seq_lengths``) cut back into their documents, for the forwards that score each row as one
    sequence (regression sets)."""
    import datasets

    if "seq_lengths" not in rows.column_names:
        return rows.select_columns(["input_ids", "assistant_masks"])
    ids, masks = [], []
    for row in rows:
        start = 0
        for n in row["seq_lengths"]:
            ids.append(row["input_ids"][start : start + n])
            masks.append(row["assistant_masks"][start : start + n])
            start += n
    features = rows.select_columns(["input_ids", "assistant_masks"]).features  # int32 ids, int8 masks
    return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks}, features=features)


# ---- the check ---------------------------------------------------------------------------------
def check_isolation(model, collator: PackedCollator, vocab_size: int, seed: int = 0) -> dict:
    """One document alone against the same document packed after another, through ``model`` and
    ``collator`` (the ones that will train), in training mode without gradients.

    ``leak``: the largest logit difference of the packed document from itself alone; ``contamination``:
    the same for the two documents run as one causal sequence (what a contaminated run computes).
    Isolated when the leak is under a fifth of the contamination (16-bit kernels differ by rounding
    only: 0.03-0.05 of logits that contamination moved by 3.5). Raises PackingError otherwise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randint(3, vocab_size, (23,), generator=g).tolist()
    b = torch.randint(3, vocab_size, (17,), generator=g).tolist()
    device = next(p.device for p in model.parameters())

    def logits_of_b(input_ids, seq_lengths):
        batch = collator([{"input_ids": input_ids, "seq_lengths": seq_lengths}])
        batch.pop("labels")
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            out = model(**batch, use_cache=False).logits
        return out[0, -len(b) :].float()

    was_training = model.training
    model.train()
    try:
        alone = logits_of_b(b, [len(b)])
        leak = (logits_of_b(a + b, [len(a), len(b)]) - alone).abs().max().item()
        contamination = (logits_of_b(a + b, [len(a) + len(b)]) - alone).abs().max().item()
    finally:
        model.train(was_training)
    result = {"leak": leak, "contamination": contamination, "isolated": leak <= 0.2 * contamination}
    if not result["isolated"]:
        raise PackingError(
            "tokenize.packing: true, but this model and backend let packed documents attend to each other "
            f"(a document's logits moved {leak:.3g} when packed after another, {contamination:.3g} as one "
            "sequence): set tokenize.packing: false, or training.backend: hf"
        )
    return result
