"""Stale Snakemake locks: a killed run's lock is removed on the next run; a live run's never is.

A SIGKILL (or a power cut) leaves ``.snakemake/locks/*.lock`` behind, and Snakemake then refuses
every later run until ``snakemake --unlock``. The workflow calls ``release_stale_lock`` while it is
parsed, before Snakemake takes its own lock: when lock files exist and no other Snakemake process
works in this folder, they are removed (what ``--unlock`` does) and one line says so. Any live
Snakemake process in this folder (another run, ``-n`` included) keeps the lock untouched.

Runs at parse time: standard library only, /proc read directly (Linux; elsewhere nothing is
unlocked and Snakemake's own message stands).
"""

from __future__ import annotations

import os
from pathlib import Path


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # ppid, after the command name
        except (OSError, ValueError, IndexError):
            break
    return out


def _directory_arg(argv: list[str], cwd: str) -> str:
    for i, arg in enumerate(argv):
        if arg in ("-d", "--directory") and i + 1 < len(argv):
            return os.path.join(cwd, argv[i + 1])
        if arg.startswith("--directory="):
            return os.path.join(cwd, arg.split("=", 1)[1])
    return cwd


def live_snakemake(workdir: str | Path, exclude: set[int] | None = None) -> list[int]:
    """PIDs of Snakemake processes working in ``workdir`` (this process and its parents excluded)."""
    target = os.path.realpath(workdir)
    skip = exclude if exclude is not None else _ancestors(os.getpid())
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue  # gone, or not ours to read
        if not any("snakemake" in os.path.basename(a) or a == "snakemake" for a in argv[:3]):
            continue
        if os.path.realpath(_directory_arg(argv, cwd)) == target:
            found.append(int(entry.name))
    return sorted(found)


def release_stale_lock(workdir: str | Path = ".") -> str | None:
    """Remove a killed run's lock files; the line to print, or None when there was nothing to do."""
    locks = Path(workdir) / ".snakemake" / "locks"
    files = sorted(locks.glob("*.lock")) if locks.is_dir() else []
    if not files or not Path("/proc/self").exists():
        return None
    me = _ancestors(os.getpid())
    others = live_snakemake(workdir, exclude={os.getpid()})
    if set(others) & me:
        return None  # a job of a running workflow (an ancestor holds the lock): not ours to judge
    live = [pid for pid in others if pid not in me]
    if live:
        return (
            f"Kiln: the lock in {locks} belongs to a running Snakemake (pid {', '.join(map(str, live))}); "
            "left in place. Wait for it, or stop it first."
        )
    for f in files:
        f.unlink(missing_ok=True)
    return (
        f"Kiln: removed a stale lock left by a run that was killed ({len(files)} file(s) in {locks}; "
        "no Snakemake process works in this folder). Incomplete outputs are rebuilt."
    )
