"""Several GPUs: ``train`` in N DDP processes through ``accelerate launch`` (one process per GPU).

The effective batch stays what the config says (kiln.microbatch.split_batch); only the main
process writes the step log, the adapter and the summary (kiln.train).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
# Run by path, not imported (kiln.codedeps): a change to it reruns training too.
RUNS = ("kiln.ddp.worker",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_json(job: dict) -> dict:
    """``train``'s keyword arguments as JSON for the worker processes (the typed ones as dicts)."""
    from dataclasses import asdict

    return {
        **job,
        "paths": asdict(job["paths"]),
        "settings": job["settings"].to_dict(),
        "tokenize": job["tokenize"].to_dict(),
    }


def _from_json(job: dict) -> dict:
    """The inverse of ``_to_json``, in a worker: the same typed values the launching process held."""
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import TrainingPaths

    return {
        **job,
        "paths": TrainingPaths(**job["paths"]),
        "settings": TrainingSettings.from_dict(job["settings"]),
        "tokenize": TokenizeSettings.from_dict(job["tokenize"]),
    }


@dataclass(frozen=True)
class Machines:
    """Where the processes of one training run are: ``count`` machines (nodes), this launcher on
    machine ``rank``, the rendezvous at ``address``:``port`` (machine 0's). One machine: the defaults."""

    count: int = 1
    rank: int = 0
    address: str = "127.0.0.1"
    port: int | None = None

    @classmethod
    def from_slurm(cls, env=os.environ) -> Machines:
        """The machines of the SLURM allocation this job step runs in (one launcher per node, started
        by ``srun --ntasks-per-node 1``): SLURM_JOB_NUM_NODES, SLURM_NODEID, the first host of
        SLURM_JOB_NODELIST as the rendezvous, the port from the job id (the same on every node)."""
        count = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        if count < 2:
            return cls()
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
        ).stdout.split()
        return cls(count, int(env["SLURM_NODEID"]), hosts[0], 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


def launch(
    job: dict, processes: int, log_file: str | None = None, allow_cpu: bool = False, machines: Machines | None = None
) -> dict | None:
    """``train(**job)`` in ``processes`` DDP (or FSDP) processes through ``accelerate launch``; the summary.

    One process per GPU of this job (CUDA_VISIBLE_DEVICES, as SLURM sets it). ``allow_cpu``: run
    the processes on CPU with gloo where there is no CUDA (what the tests do: the same code path).
    ``machines``: several nodes, ``processes`` in all, this launcher starting its share (one launcher
    per node, each called with its own rank); the summary comes back on machine 0 (None elsewhere).
    """
    import torch

    machines = machines or Machines()
    if processes % machines.count:
        raise ValueError(
            f"training.num_gpus is {processes}, which {machines.count} machines can't share evenly; "
            f"use a multiple of {machines.count}"
        )
    here = processes // machines.count
    have = torch.cuda.device_count()
    if have < here and not (allow_cpu and have == 0):
        raise RuntimeError(
            f"training.num_gpus is {processes}"
            + (f" ({here} on each of {machines.count} machines)" if machines.count > 1 else "")
            + " but this job sees "
            f"{have} CUDA device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"run it where {here} GPUs are visible on each machine (the rule asks a cluster for them as resource "
            "`gpu`) or lower training.num_gpus"
        )
    work = Path(tempfile.mkdtemp(prefix="kiln-launch-"))
    spec_file = work / "train.json"
    spec_file.write_text(json.dumps({"train": _to_json(job), "log_file": log_file}))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        str(machines.count),
        "--machine_rank",
        str(machines.rank),
        "--main_process_ip",
        machines.address,
        "--main_process_port",
        str(machines.port or _free_port()),
        "--mixed_precision",
        "no",  # the trainer sets bf16 itself from the compute dtype
        "--dynamo_backend",
        "no",
        str(Path(__file__).resolve().parent / "ddp" / "worker.py"),
        str(spec_file),
    ]
    log.info("launching %d of %d processes: %s", here, processes, " ".join(cmd))
    rc = subprocess.run(cmd, check=False).returncode
    shutil.rmtree(work, ignore_errors=True)
    if rc:
        raise RuntimeError(
            f"accelerate launch of {processes} training processes exited with status {rc}; "
            f"each process's error is printed above{f' and in {log_file}' if log_file else ''}"
        )
    if machines.rank:
        return None
    return json.loads(Path(job["paths"].summary_path).read_text())


def run_worker(spec_file: str) -> None:
    """One DDP process (kiln/ddp/worker.py): logging tagged with its rank, then ``train``."""
    spec = json.loads(Path(spec_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if spec["log_file"] and rank == 0:
        handlers.append(logging.FileHandler(spec["log_file"]))  # appends to the rule's log
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        handlers=handlers,
        force=True,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    from kiln.train import train

    train(**_from_json(spec["train"]))
    # Leave without tearing torch.distributed down: freeing a gloo process group can deadlock (its
    # destructor joins its worker threads holding the GIL that a worker needs to free a tensor),
    # seen here as a rank that never exited. Everything this process wrote is closed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
