"""Glue for rule entry points: route a job's logging and stderr into its Snakemake log file."""

from __future__ import annotations

import errno
import logging
import os
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
    _say_storage_errors(snakemake)
    return logger


STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


_STORAGE_TEXT = {
    errno.ENOSPC: ("No space left on device", "StorageFull"),
    errno.EDQUOT: ("Disk quota exceeded",),
    errno.EROFS: ("Read-only file system", "ReadOnlyFilesystem"),
}


def storage_problem(exc: BaseException, outputs: list[str], rule: str) -> str | None:
    """One line naming what could not be written and why, for the errors a user fixes by hand."""
    code, filename, seen = None, None, exc
    while seen is not None and code is None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRORS:
            code, filename = seen.errno, seen.filename
        else:  # libraries that wrap the OS error in their own (safetensors, some pyarrow paths)
            text = str(seen)
            code = next((c for c, words in _STORAGE_TEXT.items() if any(w in text for w in words)), None)
        seen = seen.__cause__ or seen.__context__
    if code is None:
        return None
    where = filename or ", ".join(outputs) or "its outputs"
    return (
        f"Kiln: rule {rule} could not write {where}: {STORAGE_ERRORS[code]} ({os.strerror(code)}). "
        "Free space or fix the folder's permissions, then run the same command again: Snakemake removes "
        "this job's partial outputs, so nothing half-written is taken as complete."
    )


def failure_line(exc: BaseException, rule: str, log_file: str | None) -> str:
    """The one line a failed job prints on the console. Kiln's own errors are phrased for the user
    (file, row, field, what to change) and shown as they are; an error raised inside a library is
    shown with its type, since its words are not Kiln's."""
    tb, origin = exc.__traceback__, None
    while tb is not None:
        origin, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    ours = origin is not None and f"{os.sep}kiln{os.sep}" in origin
    reason = str(exc) if ours and str(exc) else f"{type(exc).__name__}: {exc}"
    where = f" (details: {log_file})" if log_file else ""
    return f"Kiln: rule {rule} failed: {reason}{where}"


def _say_storage_errors(snakemake) -> None:
    """When a job fails, one line on the console (Snakemake itself shows only `message: None` and
    the log's path): a full disk or unwritable folder says so and what to do; any other error gives
    its reason."""
    previous = sys.excepthook
    outputs = [str(o) for o in snakemake.output]
    log_file = str(snakemake.log[0]) if snakemake.log else None

    def hook(kind, value, tb):
        line = storage_problem(value, outputs, snakemake.rule) or failure_line(value, snakemake.rule, log_file)
        # on a line of its own: a progress bar (kiln.progress) may hold the console's current line
        print("\n" + line, file=sys.__stderr__, flush=True)
        logging.getLogger(f"kiln.{snakemake.rule}").error(line)
        previous(kind, value, tb)

    sys.excepthook = hook


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
