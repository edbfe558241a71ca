"""Training checkpoints that are complete or not taken: run keys, completion records, resume choice.

A checkpoint folder counts only when it holds ``kiln_checkpoint.json``, written after every file
of the save (all processes) and listing each file with its size. A kill during a save leaves a
folder without that record (or with files of other sizes): it is skipped with a log line saying
why, deleted, and training resumes from the newest complete one. The record goes in before older
checkpoints are rotated away, so a complete checkpoint exists at every moment once one was made.

Transformers' own resume check only looks for a weights file; a half-written optimizer state or
trainer_state.json fails deep inside ``Trainer.train`` ("Can't find a valid checkpoint") on every
rerun, which is what this module exists to prevent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)
RUN_KEY = "kiln_run_key.json"
COMPLETE = "kiln_checkpoint.json"


def run_key(data_fingerprints: dict, base_identity: dict, tokenize: dict, settings: dict, code_files=()) -> dict:
    """What a checkpoint was made from: resuming is allowed only when all of it is unchanged."""
    code = hashlib.sha256()
    for path in code_files:
        code.update(Path(path).read_bytes())
    return {
        "data": data_fingerprints,
        "base_weights": base_identity.get("weights"),
        "tokenize": tokenize,
        "training": settings,
        "code": code.hexdigest(),
    }


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name and rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def mark_complete(folder: Path, step: int) -> None:
    """Record that every file of this checkpoint is written (call after the whole save)."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE and not p.name.startswith(f".{COMPLETE}.tmp")
    }
    _write_atomic(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def incomplete_reason(folder: Path) -> str | None:
    """None for a complete checkpoint, else why it can't be resumed from."""
    record = folder / COMPLETE
    if not record.is_file():
        return f"no {COMPLETE}: its save was interrupted"
    try:
        info = json.loads(record.read_text())
        files, step = info["files"], info["step"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE} is unreadable"
    if step != checkpoint_step(folder):
        return f"{COMPLETE} is for step {step}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    return None


def _checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=checkpoint_step)


def newest_complete(ckpt_dir: Path, remove_incomplete: bool = True) -> Path | None:
    """The newest complete checkpoint; each newer incomplete one is logged (and deleted)."""
    for folder in reversed(_checkpoint_folders(ckpt_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        log.warning("skipping %s: %s%s", folder, reason, "; deleted" if remove_incomplete else "")
        if remove_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _read_key(key_file: Path) -> dict | None:
    try:
        return json.loads(key_file.read_text())
    except (OSError, ValueError):
        return None  # missing, or cut short by a kill: not the same run


def prepare_checkpoints(ckpt_dir: Path, key: dict) -> str | None:
    """The checkpoint to resume from, or None. Checkpoints made from other inputs are set aside."""
    key_file = ckpt_dir / RUN_KEY
    if ckpt_dir.exists() and _read_key(key_file) == key:
        resume = newest_complete(ckpt_dir)
        if resume is not None:
            log.info("resuming from %s (same data, base weights and settings)", resume)
            return str(resume)
    elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        stale = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning(
            "checkpoints in %s were made from other inputs or settings; moved to %s and starting from step 0",
            ckpt_dir,
            stale,
        )
        shutil.move(str(ckpt_dir), str(stale))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(key_file, json.dumps(key, indent=2, sort_keys=True))
    return None
