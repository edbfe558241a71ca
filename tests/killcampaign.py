"""The kill campaign: the tiny pipeline SIGKILLed (whole process group) at seeded random moments in
every stage, each kill followed by the plain rerun, then every output compared by content hash with
an uninterrupted run's.

Used by tests/test_kills.py (CI) and benchmarks/kill_campaign.py (the figures README quotes).

How a campaign runs: one uninterrupted reference run gives each stage's start and duration (from
Snakemake's own ``rule X:`` / ``Finished jobid`` lines). The schedule is one kill per stage (the
parse before the first job counts as a stage) plus extra kills where the most is written, each at
a seeded random fraction of that stage's reference duration after the stage started *in the run
being killed*, and kills in training once that run has recorded a new checkpoint (so the rerun
resumes from it). Kills go in the order of the moments they aim at on the reference timeline. The
runs form a chain in a second folder: run 1 is killed at the first moment, its plain rerun at the
second, and so on; the rerun after the last kill must complete, and every job a kill stopped must
be finished by a later plain run (read from the runs' logs). A kill whose moment never comes (its
stage ended first) is not counted.

Written here rather than taken from a library: pytest-timeout / chaos tools kill a test, not a
Snakemake process group at a stage boundary read from its log.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

START = re.compile(r"^(?:local)?rule (\w+):$")
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)")
PARSE = "parse"  # before the first job: Snakemake reading the workflow and building the DAG

# Files that legitimately differ between two uninterrupted runs, with why. Everything else must be
# byte-identical after the kills. JSON files in VOLATILE_KEYS are compared with those keys removed.
DIFFERENT = {
    "logs/*": "log text: timestamps, process ids, durations",
    "logs/**/*": "log text: timestamps, process ids, durations",
    "benchmarks/**/*.tsv": "Snakemake's per-job timings",
    "checkpoints/*/tensorboard/*": "TensorBoard event files: wall time in the name and in every event",
    "**/.snakemake_timestamp": "Snakemake's own directory-output marker (a modification time)",
    "checkpoints/*/checkpoint-*/kiln_checkpoint.json": "file sizes: trainer_state.json's timings vary in length",
    "*.html": "pages render the timings of the JSON/CSV files beside them (those are compared)",
    "**/*.html": "pages render the timings of the JSON/CSV files beside them (those are compared)",
}
# Keys of measured time, speed and memory: compared nowhere (JSON and JSON-lines files, any depth).
VOLATILE_KEYS = re.compile(
    r"^(time|.*runtime.*|.*_per_second|.*_per_s|.*wall_s|wall_time_s|cpu_time_s|.*_seconds|.*rss_mb|.*peak.*_mb)$"
)


CHECKPOINT = "checkpoints/*/checkpoint-*/kiln_checkpoint.json"  # a training checkpoint recorded complete
# A stage of a second or two (compare, publish) can end sooner in the killed run than in the
# reference, so the kill aimed at it lands in the next job or after the run: it is then aimed again
# at half the fraction, in a run with that stage forced, at most this many times.
RETRIES = 3


@dataclass
class Kill:
    target: str  # the stage this kill was aimed at
    fraction: float  # of that stage's reference duration, after it started (or after `after`)
    after: str | None = None  # a glob under results/: kill only once a new file matches it
    at_s: float = -1.0  # seconds into the killed run; -1: the kill never landed
    running: list[str] = field(default_factory=list)  # jobs started and not finished at the kill
    forced: bool = False  # the stage had finished before its kill: rerun with --forcerun for it
    run: int = 0  # the run (1, 2, ...) this kill stopped; its log is run-NN.log
    finished_by_run: int | None = None  # the first later run that finished every job this kill stopped
    checkpoints: list[str] = field(default_factory=list)  # complete training checkpoints left behind
    retry_of: float | None = None  # the fraction of a kill at this stage that missed it (see RETRIES)


class WatchedRun:
    """`cmd` in its own process group, stderr read line by line with the time each line came."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path):
        self.t0, self.t0_wall = time.monotonic(), time.time()
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self.log, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            now = time.monotonic() - self.t0
            self.log.write(line)
            with self.cond:
                self.lines.append(line)
                text = line.strip()
                if m := START.match(text):
                    self.started.setdefault(m.group(1), now)
                elif m := FINISHED.match(text):
                    self.finished[m.group(1)] = now
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_started(self, rule: str, timeout: float) -> float | None:
        """Seconds into the run at which `rule` started; None when the run ended first."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while rule not in self.started:
                if self.proc.poll() is not None and not self.reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.2))
            return self.started[rule]

    def wait_new_file(self, results: Path, pattern: str, stage: str, timeout: float) -> bool:
        """Wait for a file matching `pattern` written by this run while `stage` runs; False when the
        stage (or the run) ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.stat().st_mtime >= self.t0_wall for p in results.glob(pattern)):
                return True
            if stage in self.finished or self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def kill(self) -> list[str]:
        """SIGKILL the whole process group; the jobs that were running."""
        with self.cond:
            running = sorted(set(self.started) - set(self.finished) - {"all"})
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.reader.join(timeout=10)
        self.log.close()
        return running

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.log.close()
        return rc


def stage_times(run: WatchedRun) -> dict[str, tuple[float, float]]:
    """Stage -> (start, duration) seconds of a finished run; the parse stage first."""
    first = min(run.started.values())
    out = {PARSE: (0.0, first)}
    for rule, start in sorted(run.started.items(), key=lambda kv: kv[1]):
        if rule != "all":
            out[rule] = (start, run.finished.get(rule, start) - start)
    return out


def schedule(
    stages: dict[str, tuple[float, float]], seed: int, extra: dict[str, int], after_checkpoint: int
) -> list[Kill]:
    """One kill per stage in pipeline order, `extra` more in the named stages, and `after_checkpoint`
    kills in training once a new checkpoint is recorded (the resume path); seeded fractions."""
    rng = random.Random(seed)
    kills = []
    for stage in stages:
        for _ in range(1 + extra.get(stage, 0)):
            kills.append(Kill(stage, round(rng.uniform(0.05, 0.95), 3)))
        if stage == "train":
            kills += [Kill(stage, round(rng.uniform(0.05, 0.95), 3), CHECKPOINT) for _ in range(after_checkpoint)]

    # In order of the moment they aim at on the reference run's timeline (stages that run side by
    # side interleave); those after a checkpoint last in their stage.
    def moment(k: Kill) -> tuple[float, float]:
        start, duration = stages[k.target]
        return (start + (1.0 if k.after else k.fraction) * duration, k.fraction)

    kills.sort(key=moment)
    return kills


def after_window(results: Path, pattern: str, t0_wall: float, stages: dict, stage: str) -> float:
    """Seconds from the first file matching `pattern` (a reference run begun at `t0_wall`) to the
    end of `stage`: the window a kill `after` it is placed in."""
    first = min(p.stat().st_mtime for p in results.glob(pattern)) - t0_wall
    start, duration = stages[stage]
    return max(0.05, start + duration - first)


# Keys that record the interruption itself: where a resumed training run started, and the two totals
# Transformers' final log line computes over the steps *this process* ran (its `train_loss` is the
# mean loss of the resumed steps only; every step's own loss is compared, in the same file).
RESUME_KEYS = {"resumed_from", "resumed_from_step", "train_loss", "total_flos"}


def _volatile_free(value):
    if isinstance(value, dict):
        return {k: _volatile_free(v) for k, v in value.items() if not VOLATILE_KEYS.match(k) and k not in RESUME_KEYS}
    if isinstance(value, list):
        return [_volatile_free(v) for v in value]
    return value


def _table_free(rows: list[list[str]]) -> list[list[str]]:
    """A table (header row first) less its VOLATILE_KEYS columns."""
    if not rows:
        return rows
    keep = [i for i, name in enumerate(rows[0]) if not VOLATILE_KEYS.match(name.strip())]
    return [[row[i] for i in keep if i < len(row)] for row in rows]


def _comparable(path: Path, data: bytes) -> bytes:
    """The bytes compared: JSON, JSON lines, CSV and Markdown tables less their measured timings."""
    try:
        if path.suffix == ".json":
            return json.dumps(_volatile_free(json.loads(data)), sort_keys=True).encode()
        if path.suffix == ".jsonl":
            return json.dumps([_volatile_free(json.loads(x)) for x in data.splitlines() if x.strip()]).encode()
        if path.suffix == ".csv":
            return json.dumps(_table_free(list(csv.reader(io.StringIO(data.decode()))))).encode()
        if path.suffix == ".md":
            lines = data.decode().splitlines()
            table = [ln.strip().strip("|").split("|") for ln in lines if ln.startswith("|")]
            rest = [ln for ln in lines if not ln.startswith("|")]
            return json.dumps([rest, _table_free(table)]).encode()
    except ValueError:
        pass  # not what its name says: its bytes
    return data


def content_hashes(results: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `results` (its comparable bytes)."""
    out = {}
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        rel = path.relative_to(results).as_posix()
        data = _comparable(path, path.read_bytes())
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def legitimately_different(rel: str) -> str | None:
    for pattern, why in DIFFERENT.items():
        if fnmatch.fnmatch(rel, pattern):
            return why
    return None


def compare(reference: dict[str, str], other: dict[str, str]) -> dict:
    exempt = sorted(r for r in set(reference) | set(other) if legitimately_different(r))
    checked = sorted(set(reference) - set(exempt))
    return {
        "checked": len(checked),
        "identical": sum(reference[r] == other.get(r) for r in checked),
        "different": sorted(r for r in checked if r in other and reference[r] != other[r]),
        "missing": sorted(r for r in checked if r not in other),
        "extra": sorted(r for r in set(other) - set(reference) if not legitimately_different(r)),
        "exempt": len(exempt),
    }


def campaign(
    command: list[str],
    workdir: Path,
    seed: int,
    extra: dict[str, int],
    after_checkpoint: int = 2,
) -> dict:
    """Run the reference, then the chain of killed runs, with the same command in the same folder
    (which already holds its config): the reference's outputs are moved to ``reference-results``
    (and Snakemake's state to ``reference-snakemake``) before the chain starts. One folder, because
    outputs may record absolute paths (the adapter's base model path, so that it loads from any
    directory) and those must be the same bytes for the comparison to mean anything."""
    chain_dir = workdir
    t_start = time.monotonic()
    ref = WatchedRun(command, workdir, workdir / "run-reference.log")
    if ref.finish(timeout=1800):
        raise AssertionError(f"the uninterrupted run failed: see {workdir / 'run-reference.log'}")
    (workdir / "results").rename(workdir / "reference-results")
    (workdir / ".snakemake").rename(workdir / "reference-snakemake")
    stages = stage_times(ref)
    kills = schedule(stages, seed, extra, after_checkpoint)
    window = after_window(workdir / "reference-results", CHECKPOINT, ref.t0_wall, stages, "train")
    runs, run = 0, None
    queue = list(kills)
    while queue:
        kill = queue.pop(0)
        if run is None:
            runs += 1
            run = WatchedRun(command, chain_dir, chain_dir / f"run-{runs:02d}.log")
        start = 0.0 if kill.target == PARSE else run.wait_started(kill.target, timeout=600)
        if start is None:  # the run ended without running the stage: everything was built
            rc, run = run.finish(timeout=1800), None
            if rc:
                raise AssertionError(f"run {runs} failed (rc {rc}): see {chain_dir}/run-{runs:02d}.log")
            if kill.after is not None:
                continue
            # A short stage that ran side by side with the one killed before it finished in that
            # run, so its own kill had nothing to land in: run the same command with that stage
            # forced (`--forcerun`: it reruns, and what follows it) and aim the kill there.
            runs += 1
            kill.forced = True
            run = WatchedRun([*command, "--forcerun", kill.target], chain_dir, chain_dir / f"run-{runs:02d}.log")
            start = run.wait_started(kill.target, timeout=600)
            if start is None:
                rc, run = run.finish(timeout=1800), None
                if rc:
                    raise AssertionError(f"run {runs} failed (rc {rc}): see {chain_dir}/run-{runs:02d}.log")
                continue
        if kill.after is None:
            delay = start + kill.fraction * stages[kill.target][1] - (time.monotonic() - run.t0)
        elif run.wait_new_file(chain_dir / "results", kill.after, kill.target, timeout=600):
            delay = kill.fraction * window
        else:
            continue  # the stage ended without a new checkpoint: no kill; the run goes on to the next
        time.sleep(max(0.0, delay))
        kill.at_s, kill.run = round(time.monotonic() - run.t0, 2), runs
        kill.running = run.kill()
        kill.checkpoints = sorted(
            p.parent.name for p in (chain_dir / "results" / "checkpoints").glob("*/checkpoint-*/kiln_checkpoint.json")
        )
        rc, run = run.proc.returncode, None
        if rc == 0:  # the run ended before the moment came: no kill landed
            kill.at_s, kill.running = -1.0, []
        elif rc != -signal.SIGKILL:
            raise AssertionError(f"run {runs} failed before its kill: see {chain_dir}/run-{runs:02d}.log")
        missed = kill.target != PARSE and kill.after is None and kill.target not in kill.running
        if missed and sum(k.target == kill.target and k.retry_of is not None for k in kills) < RETRIES:
            again = Kill(kill.target, round(kill.fraction / 2, 3), retry_of=kill.fraction)
            kills.insert(next(i for i, k in enumerate(kills) if k is kill) + 1, again)  # this kill, not an equal one
            queue.insert(0, again)
    if run is not None:
        rc = run.finish(timeout=1800)
    else:
        runs += 1
        rc = WatchedRun(command, chain_dir, chain_dir / f"run-{runs:02d}.log").finish(timeout=1800)
    # Which later run finished the job(s) each kill stopped: read from the runs' logs.
    finished = {
        n: set(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", (chain_dir / f"run-{n:02d}.log").read_text()))
        for n in range(1, runs + 1)
    }
    for kill in kills:
        if kill.at_s >= 0:
            later = (
                n
                for n in range(kill.run + 1, runs + 1)
                if set(kill.running) <= set().union(*(finished[m] for m in range(kill.run + 1, n + 1)))
            )
            kill.finished_by_run = next(later, None)
    landed = [k for k in kills if k.at_s >= 0]
    result = compare(content_hashes(workdir / "reference-results"), content_hashes(workdir / "results"))
    return {
        "seed": seed,
        "kills": len(landed),
        "stages": list(stages),
        "stages_hit": sorted({job for k in landed for job in k.running} | ({PARSE} & {k.target for k in landed})),
        "between_jobs": sum(1 for k in landed if not k.running and k.target != PARSE),
        "runs": runs,
        "completed": rc == 0,
        "reference_s": round(sum(d for _, d in stages.values()), 1),
        "campaign_s": round(time.monotonic() - t_start, 1),
        "checkpoint_window_s": round(window, 2),
        "schedule": [asdict(k) for k in kills],
        **result,
        "exempt_patterns": DIFFERENT,
        "volatile_json_keys": VOLATILE_KEYS.pattern,
        "resume_json_keys": sorted(RESUME_KEYS),
    }
