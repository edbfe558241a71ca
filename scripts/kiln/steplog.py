"""The training step log (one JSON line per logged step, each step once across resumes) and its plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

STEP_LOG = "steps.jsonl"  # in the checkpoint folder; copied to the rule output at the end


def _json_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            json.loads(line)
        except ValueError:
            continue
        out.append(line)
    return out


def step_logger(path: Path, start_step: int):
    """A TrainerCallback writing one JSON line per logged step (loss, lr, grad norm, tokens/s)."""
    from transformers import TrainerCallback

    # Keep only lines up to the resume point, so a resumed run logs each step exactly once.
    # A kill can cut the last line short: lines that don't parse are dropped with the rest.
    kept = [ln for ln in _json_lines(path) if json.loads(ln).get("step", 0) <= start_step]
    path.write_text("".join(ln + "\n" for ln in kept))

    class StepLog(TrainerCallback):
        def __init__(self):
            self.t0, self.tokens0 = time.perf_counter(), None
            self.resume_pending = bool(start_step)  # mark the first line written after a resume

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            row = {"step": state.global_step, "time": round(time.time(), 3), **logs}
            if "loss" in logs and self.tokens0 is not None and now > self.t0:
                row["tokens_per_s"] = round((tokens - self.tokens0) / (now - self.t0), 1)
            if "loss" in logs:
                self.t0, self.tokens0 = now, tokens
            if self.resume_pending:
                row["resumed_from"] = start_step
                self.resume_pending = False
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    return StepLog()


def plot_loss(step_log: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in step_log.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss (assistant tokens)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def estimated_tokens(train_ds, epochs: float) -> int:
    """Tokens trained, from the share of the data seen (the lean step does not count per step).

    Packed or not, the rows' ``input_ids`` hold every training token once.
    """
    import pyarrow.compute as pc

    total = pc.sum(pc.list_value_length(train_ds.data.column("input_ids"))).as_py() or 0
    return int(round(total * epochs))
