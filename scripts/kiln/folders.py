"""What is wrong with a user's folder, in words: used at parse time (kiln.config) and by the job
that reads it (kiln.base_model). A module of its own so that neither makes the other's rule rerun."""

from __future__ import annotations

from pathlib import Path


def local_model_problem(folder: str | Path) -> str | None:
    """Why a `local` model folder can't be loaded, or None."""
    path = Path(folder)
    if not path.exists():
        return f"folder '{folder}' does not exist (relative paths are from the working directory {Path.cwd()})"
    if not path.is_dir():
        return f"'{folder}' is a file, not a model folder"
    if not (path / "config.json").exists():
        return f"folder '{folder}' has no config.json (expected a model saved by transformers' save_pretrained)"
    return None
