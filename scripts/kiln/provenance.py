"""Provenance: the packages, the code version and the hardware a result was made with.

Cheap enough for parse time: ``code_version`` and ``package_versions`` are rule parameters (a new
commit, a dirty tree or an upgraded package reruns the manifest); ``hardware`` runs in the jobs.
Used by the manifest (kiln.manifest) and by training (the environment training really ran in).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import resource
import subprocess
from pathlib import Path

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "unsloth",
    "unsloth_zoo",
    "datasets",
    "tokenizers",
    "pandas",
    "pyarrow",
    "snakemake",
)


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed), and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version(repo: str | Path) -> dict:
    """Git commit of the workflow's checkout; when the tree is dirty, a hash of what differs."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": f"{repo} is not a git checkout (or git is missing)"}
    status = git("status", "--porcelain", "--untracked-files=all")
    out = {"commit": commit, "dirty": bool(status.strip())}
    if out["dirty"]:
        h = hashlib.sha256(git("diff", "HEAD", "--binary").encode())
        for line in status.splitlines():
            if line.startswith("??"):
                path = Path(repo) / line[3:]
                h.update(line.encode() + (path.read_bytes() if path.is_file() else b""))
        out["diff_sha256"] = h.hexdigest()
        out["changed_files"] = [line[3:] for line in status.splitlines()][:50]
    return out


def hardware() -> dict:
    """The machine this runs on: CPU model and cores, memory, and the GPU when torch sees one."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out: dict = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        out["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out["gpu"] = {
                "name": props.name,
                "count": torch.cuda.device_count(),
                "memory_gb": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
            }
        else:
            out["gpu"] = None
    except ImportError:
        out["gpu"] = None
    return out


def peak_memory_mb() -> dict:
    """This process's peak memory so far: resident set, and allocated on the GPU where there is one."""
    import torch

    out = {"cpu_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
