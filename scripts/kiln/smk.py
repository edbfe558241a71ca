"""Glue for rule entry points: route a job's logging and stderr into its Snakemake log file."""

from __future__ import annotations

import logging
import sys


def setup_log(snakemake, console: bool = False) -> logging.Logger:
    """Send the `logging` module (and, unless ``console``, all of stderr) to ``snakemake.log[0]``.

    With ``console`` the log file gets every log record and stderr stays on the terminal, so a
    progress bar with its ETA is visible while the job runs.
    """
    handlers: list[logging.Handler] = []
    if snakemake.log:
        stream = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115 (lives as long as the job)
        handlers.append(logging.StreamHandler(stream))
        if not console:
            sys.stderr = stream
    if console or not snakemake.log:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return logging.getLogger(f"kiln.{snakemake.rule}")
