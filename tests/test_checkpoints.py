"""Checkpoints are complete or not taken: a kill during a save never stops a later resume."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import train_tiny

from kiln.checkpoints import COMPLETE, incomplete_reason, mark_complete, prepare_checkpoints


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (ck / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(ck, step)
    return ck


def test_an_empty_checkpoint_left_by_a_kill_is_skipped_and_said(tmp_path, caplog):
    # The reported case: a kill during the save left an empty checkpoint-4 beside a complete one.
    key = {"k": 1}
    assert prepare_checkpoints(tmp_path, key) is None
    _checkpoint(tmp_path, 2)
    (tmp_path / "checkpoint-4").mkdir()
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoints"):
        resume = prepare_checkpoints(tmp_path, key)
    assert resume == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4: no kiln_checkpoint.json: its save was interrupted; deleted" in caplog.text
    assert not (tmp_path / "checkpoint-4").exists()


def test_a_file_cut_short_or_missing_makes_a_checkpoint_incomplete(tmp_path):
    ck = _checkpoint(tmp_path, 6)
    assert incomplete_reason(ck) is None
    (ck / "adapter_model.safetensors").write_bytes(b"x" * 10)
    assert incomplete_reason(ck) == "adapter_model.safetensors has 10 bytes, 100 were saved"
    (ck / "adapter_model.safetensors").unlink()
    assert incomplete_reason(ck) == "adapter_model.safetensors is missing"
    (ck / COMPLETE).write_text('{"step": 6, "fi')  # the record itself cut short
    assert incomplete_reason(ck) == f"{COMPLETE} is unreadable"


def test_no_complete_checkpoint_starts_again_and_a_cut_run_key_is_not_a_match(tmp_path):
    key = {"k": 1}
    prepare_checkpoints(tmp_path, key)
    _checkpoint(tmp_path, 2, complete=False)
    assert prepare_checkpoints(tmp_path, key) is None  # nothing complete: from step 0
    (tmp_path / "kiln_run_key.json").write_text('{"k"')  # a kill while writing the key
    assert prepare_checkpoints(tmp_path, key) is None
    assert list(tmp_path.parent.glob(f"{tmp_path.name}.stale-*"))  # set aside, not resumed


def _train(tiny_run, out: Path, **overrides):
    return train_tiny(tiny_run, out, **{"max_steps": 4, "save_steps": 2, "eval_steps": 0, **overrides})


def _losses(out: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (out / "s.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_a_kill_at_any_file_of_a_save_resumes_to_the_same_losses(tiny_run, tmp_path):
    """Fault injection: the on-disk state a kill leaves while checkpoint-4 is written, at each of its
    files in the order the trainer wrote them (earlier files whole, this one cut in half, later ones
    absent), and once with every file written but the completion record not yet. Each rerun resumes
    from checkpoint-2 and finishes 4 steps with the uninterrupted run's losses."""
    clean = tmp_path / "clean"
    summary = _train(tiny_run, clean)
    assert summary["steps"] == 4
    losses = _losses(clean)
    adapter = (clean / "adapter" / "adapter_model.safetensors").read_bytes()
    ckpt = clean / "ckpt"
    assert incomplete_reason(ckpt / "checkpoint-2") is None and incomplete_reason(ckpt / "checkpoint-4") is None
    written = sorted(
        (p for p in (ckpt / "checkpoint-4").rglob("*") if p.is_file() and p.name != COMPLETE),
        key=lambda p: p.stat().st_mtime_ns,
    )
    assert {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors", "rng_state.pth"} <= {
        p.name for p in written
    }
    log_to_step4 = (ckpt / "steps.jsonl").read_text()
    cases = [(i, p.relative_to(ckpt / "checkpoint-4")) for i, p in enumerate(written)] + [(len(written), None)]
    for i, cut in cases:
        run = tmp_path / f"kill-{i}"
        (run / "ckpt").mkdir(parents=True)
        shutil.copy(ckpt / "kiln_run_key.json", run / "ckpt")
        shutil.copytree(ckpt / "checkpoint-2", run / "ckpt" / "checkpoint-2")
        (run / "ckpt" / "steps.jsonl").write_text(log_to_step4)
        for p in written[:i]:
            dst = run / "ckpt" / "checkpoint-4" / p.relative_to(ckpt / "checkpoint-4")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
        if cut is not None:
            data = (ckpt / "checkpoint-4" / cut).read_bytes()
            dst = run / "ckpt" / "checkpoint-4" / cut
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data[: len(data) // 2])
        resumed = _train(tiny_run, run)
        assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4, (i, cut)
        assert _losses(run) == losses, (i, cut)  # bit-identical, as is the adapter
        assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter, (i, cut)
        assert incomplete_reason(run / "ckpt" / "checkpoint-4") is None  # written again, whole


@pytest.mark.slow
def test_a_kill_after_the_last_checkpoint_trains_nothing_more(tiny_run, tmp_path):
    """Killed after the last step's checkpoint was recorded, before the adapter was saved: the rerun
    saves that checkpoint's adapter and trains nothing. Transformers' resume trained a 5th step of a
    4-step run (and a 6th on the next kill): the kill campaign found checkpoint-5 and checkpoint-6."""
    clean = tmp_path / "clean"
    _train(tiny_run, clean)
    run = tmp_path / "killed"
    shutil.copytree(clean / "ckpt", run / "ckpt")
    log = run / "ckpt" / "steps.jsonl"  # the kill came before training's last log line
    log.write_text("".join(ln + "\n" for ln in log.read_text().splitlines() if "total_flos" not in ln))
    resumed = _train(tiny_run, run)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 4
    assert sorted(p.name for p in (run / "ckpt").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (clean / "ckpt" / "README.md").exists()  # TRL's card for "[None]" (kiln.trainer)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (
        clean / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert _losses(run) == _losses(clean)
    last = json.loads((run / "s.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["resumed_from"] == 4  # training's end, said once
