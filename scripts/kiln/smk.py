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
    logger = logging.getLogger(f"kiln.{snakemake.rule}")
    if console and snakemake.log:
        # stderr stays on the terminal: put the error that ends the job in the log file too.
        def log_uncaught(kind, value, tb):
            logger.error("%s failed: %s: %s", snakemake.rule, kind.__name__, value, exc_info=(kind, value, tb))

        sys.excepthook = log_uncaught
    return logger


def use_cores(snakemake) -> int:
    """Give torch the job's threads; a model job given one thread gets every core of the machine.

    Snakemake sets OMP_NUM_THREADS to a job's threads, so under ``--cores 1`` (jobs strictly one
    at a time, the documented way to run Kiln) torch would use one core and train at half speed
    on a 2-core machine, with the other core idle. One job at a time cannot oversubscribe, so use
    them all there (the model rules ask for ``workflow.cores`` threads, so they get one thread only
    under ``--cores 1``); otherwise respect what Snakemake gave the job.
    """
    import os

    import torch

    threads = snakemake.threads if snakemake.threads > 1 else len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads
