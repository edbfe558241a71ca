"""Glue for rule entry points: route a job's logging and stderr into its Snakemake log file."""

from __future__ import annotations

import logging
import sys


def setup_log(snakemake) -> logging.Logger:
    """Send stderr and the `logging` module to ``snakemake.log[0]`` (the log: of every rule)."""
    if snakemake.log:
        stream = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115 (lives as long as the job)
        sys.stderr = stream
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(f"kiln.{snakemake.rule}")
