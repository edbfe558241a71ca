"""One dtype resolver: what a settings value (``auto``, ``float32``, ``bfloat16``, ``float16``) means
as a torch dtype, for training's compute, evaluation's models and the merged weights' saving."""

from __future__ import annotations

import json
from pathlib import Path


def compute_dtype(requested: str = "auto"):
    """``auto``: bfloat16 on a CUDA card that has it, float32 otherwise (on the CPU, NF4 with bf16
    compute diverged from the plain path; a card without bf16 would round it in software)."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def saved_dtype(requested: str, base_dir: str | Path | None = None):
    """The merged weights' dtype. ``auto``: the dtype the base model was saved in (its
    identity.json), float32 if unknown."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    identity = Path(base_dir, "identity.json") if base_dir else None
    saved = json.loads(identity.read_text()).get("dtype") if identity and identity.exists() else None
    return getattr(torch, saved or "float32")
