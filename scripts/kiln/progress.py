"""Progress on the console for long jobs: a bar with its ETA (tqdm, as Transformers' trainer uses).

A job's own stderr goes to its log file; these bars write to the console the job was started from
(``sys.__stderr__``), so minutes of work are not silent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


def progress(total: int, desc: str):
    """A bar over ``total`` units of work (generation batches, rows)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.__stderr__, mininterval=5, disable=total == 0, leave=False)


class Phases:
    """A bar over a job's named phases: ``with phases.step("merge + save"): ...``. Its ETA comes
    from the phases done so far; the postfix names the one running."""

    def __init__(self, desc: str, names: list[str]):
        from tqdm.auto import tqdm

        self.names = names
        self.bar = tqdm(total=len(names), desc=desc, file=sys.__stderr__, mininterval=0, leave=False)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        try:
            yield
        except BaseException:
            self.bar.close()  # the console line is cleared for the error that follows
            raise
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
