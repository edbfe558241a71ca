"""QLoRA training recipe: tokenized data + base model -> LoRA adapter, step log, loss curve.

Reads top to bottom: settings -> backend -> resume decision -> model -> trainer -> train -> save.

Supports: NF4 4-bit base weights with double quantization (or none: plain LoRA), PEFT LoRA on
configured modules, TRL SFTTrainer on pre-tokenized data (loss on assistant tokens via the
``assistant_masks`` column), periodic validation, early stopping, seeded runs and checkpoints.

Saves: the adapter (safetensors + adapter_config.json) with ``kiln_training.json`` beside it (the
resolved config, base model and dtype: everything merge needs), a JSONL step log, a loss PNG and a
summary (tokens, wall time, peak memory).

Resume: checkpoints live in a folder Snakemake does not own, keyed by a fingerprint of the inputs
(data, base weights, settings). A rerun with the same key resumes from the last checkpoint; a
different key sets the old checkpoints aside (with a message) and starts again.

Several GPUs: ``launch`` runs ``train`` in N processes through ``accelerate launch`` (DDP, one
process per GPU, each loading the 4-bit base on its own card). The effective batch stays what the
config says (per_device_batch_size x gradient_accumulation_steps sequences per optimizer step, all
processes together), so the learning rate means the same thing on 1 or N GPUs: each process takes
1/N of it, by fewer accumulation steps (or, when those don't divide, a smaller micro-batch).
Only the main process writes the step log, the adapter and the summary.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kiln.backends import load_for_training, resolve_backend, resolve_dtype
from kiln.checkpoints import mark_complete, prepare_checkpoints, run_key
from kiln.codedeps import code_files

log = logging.getLogger(__name__)
STEP_LOG = "steps.jsonl"
# Run by path, not imported (kiln.codedeps): a change to it reruns training too.
RUNS = ("kiln.ddp.worker",)
# The code a checkpoint was made by (this module and what it runs): another version starts again.
TRAINING_CODE = code_files(__file__)


def _step_logger(path: Path, start_step: int):
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


def _json_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            json.loads(line)
        except ValueError:
            continue
        out.append(line)
    return out


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


def _peak_memory_mb() -> dict:
    import torch

    out = {"cpu_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def train(
    tokenized_dir: str,
    base_dir: str,
    adapter_dir: str,
    step_log_out: str,
    loss_png: str,
    summary_path: str,
    ckpt_dir: str,
    settings: dict,
    tokenize: dict,
    data_fingerprints: dict,
    experiment: str = "",
    threads: int | None = None,
    tracking: dict | None = None,
) -> dict:
    t_start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (torchrun)
    backend, reason = resolve_backend(settings["backend"], processes=world)
    log.info("backend: %s (%s)", backend, reason)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (patches transformers and TRL: must come before them, this process only)
    dtype = resolve_dtype(settings["compute_dtype"])
    base_identity = json.loads((Path(base_dir) / "identity.json").read_text())

    import datasets

    datasets.disable_caching()  # no cache-*.arrow files written into another rule's output
    import torch
    import transformers
    from transformers import AutoTokenizer, EarlyStoppingCallback
    from trl import SFTConfig

    from kiln.manifest import hardware, package_versions

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    state = None
    if world > 1:
        from accelerate import PartialState

        # Before the model loads: joins the process group and makes this process's GPU current
        # (cpu=True on a machine without CUDA: gloo, what the CPU tests run).
        state = PartialState(cpu=not cuda)
        if not cuda:
            # accelerate names the device "cpu:0", which torch.load can't map a checkpoint to
            # (Trainer loads the optimizer state onto args.device when resuming under DDP).
            state.device = torch.device("cpu")
    main = state is None or state.is_main_process
    ckpt = Path(ckpt_dir)
    key = run_key(data_fingerprints, base_identity, tokenize, settings, TRAINING_CODE)
    if state is None:
        resume = prepare_checkpoints(ckpt, key)
    else:
        with state.main_process_first():  # the main process sets stale checkpoints aside first
            resume = prepare_checkpoints(ckpt, key)
    start_step = int(Path(resume).name.split("-")[1]) if resume else 0

    transformers.set_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model, peft_config = load_for_training(backend, base_dir, settings, dtype, tokenize["max_seq_len"])
    data = datasets.load_from_disk(tokenized_dir)
    columns = [c for c in ("input_ids", "assistant_masks", "seq_lengths") if c in data["train"].column_names]
    train_ds = data["train"].select_columns(columns)
    eval_ds = None
    if settings["eval_steps"] and len(data["validation"]):
        n_eval = min(settings["eval_samples"], len(data["validation"]))
        eval_ds = data["validation"].select(range(n_eval)).select_columns(columns)
    packed = "seq_lengths" in columns

    early = settings["early_stopping_patience"] > 0 and eval_ds is not None
    if early and settings["save_steps"] % settings["eval_steps"]:
        raise ValueError(
            "training.early_stopping_patience needs save_steps to be a multiple of eval_steps "
            f"(got save_steps={settings['save_steps']}, eval_steps={settings['eval_steps']})"
        )
    micro, accum = split_batch(settings["per_device_batch_size"], settings["gradient_accumulation_steps"], world)
    probe = None
    if settings["auto_micro_batch"] and cuda:
        micro, accum, probe = auto_micro_batch(model, micro * accum, tokenize["max_seq_len"], dtype)
        if state is not None:  # every process must step together: the smallest pick wins
            picks = torch.tensor([micro], device=state.device)
            torch.distributed.all_reduce(picks, op=torch.distributed.ReduceOp.MIN)
            micro, accum = int(picks.item()), micro * accum // int(picks.item())
        log.info("micro-batch %d x %d accumulation steps (effective batch kept): %s", micro, accum, probe)
    if world > 1:
        log.info(
            "%d processes x micro-batch %d x %d accumulation steps = effective batch %d (as configured)",
            world,
            micro,
            accum,
            world * micro * accum,
        )
    lean = not settings["step_metrics"]
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ckpt / "tensorboard")
    report_to = ["tensorboard"] + _mlflow_setup(tracking or {}, experiment)
    args = SFTConfig(
        output_dir=str(ckpt),
        max_steps=settings["max_steps"],
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=settings["warmup_ratio"],
        weight_decay=settings["weight_decay"],
        max_grad_norm=settings["max_grad_norm"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        logging_steps=settings["logging_steps"],
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_total_limit=settings["save_total_limit"],
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=settings["eval_steps"] or None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        seed=settings["seed"],
        data_seed=settings["seed"],
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        # Packed rows are already at most max_seq_len (TRL refuses a max_length with padding_free).
        max_length=None if packed else tokenize["max_seq_len"],
        packing=False,
        padding_free=packed,
        # Counting tokens costs a host sync every step; the lean step estimates them from the data.
        include_num_input_tokens_seen="no" if lean else True,
        report_to=report_to,
        run_name=experiment,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        dataset_num_proc=None,
        disable_tqdm=False,
        # DDP: every LoRA weight gets a gradient each step; reentrant checkpointing breaks DDP hooks.
        ddp_find_unused_parameters=False if world > 1 else None,
        gradient_checkpointing_kwargs={"use_reentrant": False} if world > 1 else None,
        # CPU DDP: keep the process state made above (its plain "cpu" device, see there).
        accelerator_config={"use_configured_state": True} if world > 1 and not cuda else None,
    )
    if world == 1 and args.n_gpu > 1:
        # One process that sees several GPUs: Trainer would split each batch over them with
        # nn.DataParallel (which TRL refuses). The model sits on the current GPU; train there.
        # Several GPUs are used through training.num_gpus (DDP) instead.
        log.info(
            "%d GPUs visible to one process: training on %s only (set training.num_gpus for DDP)",
            args.n_gpu,
            args.device,
        )
        args._n_gpu = 1
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        adapter_dtype=dtype if dtype == torch.float32 else None,
        lean=lean,
        callbacks=([_step_logger(ckpt / STEP_LOG, start_step)] if main else [])
        + ([EarlyStoppingCallback(settings["early_stopping_patience"])] if early else []),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    peaks = [_peak_memory_mb()]
    if state is not None:
        from accelerate.utils import gather_object

        peaks = gather_object(peaks)  # every process's peak, in rank order
    if not main:
        return {}

    adapter = Path(adapter_dir)
    trainer.model.save_pretrained(adapter, safe_serialization=True)
    tokenizer.save_pretrained(adapter)
    resolved = {
        "experiment": experiment,
        "base_model_dir": str(Path(base_dir)),
        # Relative to this adapter folder: found again wherever the results tree is read from.
        "base_model_relpath": os.path.relpath(base_dir, adapter_dir),
        "base_identity": base_identity,
        "backend": backend,
        "backend_reason": reason,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantization": settings["quantization"],
        "training": settings,
        "tokenize": tokenize,
        "data_fingerprints": data_fingerprints,
    }
    (adapter / "kiln_training.json").write_text(json.dumps(resolved, indent=2))
    shutil.copyfile(ckpt / STEP_LOG, step_log_out)
    plot_loss(Path(step_log_out), Path(loss_png), f"{experiment or 'training'}: {backend}, {resolved['compute_dtype']}")

    history = [json.loads(ln) for ln in Path(step_log_out).read_text().splitlines()]
    losses = [r["loss"] for r in history if "loss" in r]
    summary = {
        "backend": backend,
        "backend_reason": reason,
        "compute_dtype": resolved["compute_dtype"],
        "steps": trainer.state.global_step,
        "resumed_from_step": start_step,
        "tokens_trained": int(trainer.state.num_input_tokens_seen)
        if not lean
        else _estimated_tokens(train_ds, trainer.state.epoch or 0.0),
        "tokens_trained_estimated": lean,
        "processes": world,
        "micro_batch": micro,
        "gradient_accumulation_steps": accum,
        "effective_batch": world * micro * accum,
        "micro_batch_probe": probe,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "train_runtime_s": round(result.metrics.get("train_runtime", math.nan), 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": [r["eval_loss"] for r in history if "eval_loss" in r],
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "peak_memory": peaks[0],
        "peak_memory_per_process": peaks if world > 1 else None,
        "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "hardware": hardware(),
        "packages": package_versions(),  # of the environment training really ran in
    }
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training loss is missing or not finite: {losses[-5:]}")
    Path(summary_path).write_text(json.dumps(summary, indent=2))
    log.info(
        "trained %s steps, loss %.4f -> %.4f, %s tokens in %.0f s",
        summary["steps"],
        summary["first_loss"],
        summary["final_loss"],
        summary["tokens_trained"],
        summary["wall_time_s"],
    )
    return summary


def _estimated_tokens(train_ds, epochs: float) -> int:
    """Tokens trained, from the share of the data seen (the lean step does not count per step).

    Packed or not, the rows' ``input_ids`` hold every training token once.
    """
    import pyarrow.compute as pc

    total = pc.sum(pc.list_value_length(train_ds.data.column("input_ids"))).as_py() or 0
    return int(round(total * epochs))


def auto_micro_batch(model, effective: int, seq_len: int, dtype, budget: float = 0.85) -> tuple[int, int, dict]:
    """The largest micro-batch that divides the effective batch and fits the card at ``seq_len``.

    Each candidate (effective, effective/2, ...) runs one forward and backward on a full-length
    batch; the first whose peak memory stays under ``budget`` of the card wins. The effective batch
    (micro x accumulation) is what the config says, so the optimisation is unchanged.
    """
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    device = next(p.device for p in model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    tried = {}
    candidates = [m for m in range(effective, 0, -1) if (effective % m == 0 and m & (m - 1) == 0) or m == effective]
    # Before TRL adds LoRA (hf backend) nothing is trainable: let the activations carry gradients
    # instead, which costs the same memory as training the adapters would (a little more: no
    # checkpointing yet), so the pick errs on the safe side.
    frozen = not any(p.requires_grad for p in model.parameters())
    if frozen:
        model.enable_input_require_grads()
    model.train()
    for m in candidates:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            ids = torch.randint(3, vocab, (m, seq_len), device=device)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            peak = torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            peak = None
        finally:
            model.zero_grad(set_to_none=True)
            loss = ids = None
            torch.cuda.empty_cache()
        tried[m] = None if peak is None else round(peak / 2**30, 2)
        if peak is not None and peak <= budget * total:
            if frozen:
                model.disable_input_require_grads()
            return m, effective // m, {"peak_gib_by_micro_batch": tried, "card_gib": round(total / 2**30, 1)}
    raise RuntimeError(f"not even a micro-batch of 1 x {seq_len} tokens fits the card: {tried}")


def _mlflow_setup(tracking: dict, experiment: str | None) -> list[str]:
    """MLflow through the Trainer's own callback when the config names a tracking URI, else nothing."""
    uri = tracking.get("mlflow_uri") or ""
    if not uri:
        return []
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise RuntimeError(f"tracking.mlflow_uri is {uri!r} but MLflow is not installed: pip install mlflow-skinny")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = tracking.get("mlflow_experiment") or "kiln"
    os.environ.setdefault("MLFLOW_FLATTEN_PARAMS", "TRUE")
    if "://" not in uri or uri.startswith("file:"):
        # A folder store is what was asked for; MLflow 3 wants this opt-in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    log.info("MLflow: run %r in experiment %r at %s", experiment, os.environ["MLFLOW_EXPERIMENT_NAME"], uri)
    return ["mlflow"]


def _fused_loss_available() -> bool:
    from trl.trainer import utils as trl_utils

    return getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer, with a loss that also runs where TRL's fused LM-head kernel can't."""
    from transformers import Trainer
    from trl import SFTTrainer

    class KilnSFTTrainer(SFTTrainer):
        """Two corrections to TRL 1.15 for the CPU path.

        - TRL casts QLoRA adapter weights to bfloat16 whatever the compute dtype. With float32
          compute on a CPU that made every LoRA matmul a slow bf16 one (2x the step time) and is
          where the bf16 divergence came from; ``adapter_dtype`` casts them back.
        - TRL computes the loss with a chunked LM-head kernel written in Triton; without Triton (a
          CPU machine) the kernel is missing and training crashes. The model's own causal-LM loss
          on the same labels is the same quantity, so it is used there.
        """

        def __init__(self, *args, adapter_dtype=None, lean=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.kiln_lean = lean
            if adapter_dtype is not None:
                for param in self.model.parameters():
                    if param.requires_grad and param.dtype != adapter_dtype:
                        param.data = param.data.to(adapter_dtype)

        def _save_checkpoint(self, model, trial):
            """Transformers' save, then Kiln's completion record, then rotation of old checkpoints.

            Rotation waits until the new checkpoint is recorded complete, so a kill at any moment
            leaves at least one complete checkpoint behind (kiln.checkpoints).
            """
            import torch.distributed as dist
            from transformers.trainer_utils import rotate_checkpoints

            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every process has written its files (its RNG state)
            if self.args.should_save:
                run_dir = Path(self._get_output_dir(trial=trial))
                mark_complete(run_dir / f"checkpoint-{self.state.global_step}", self.state.global_step)
                rotate_checkpoints(str(run_dir), limit, self.state.best_model_checkpoint, use_mtime=True)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.kiln_lean:
                # The model's own loss (Unsloth's fused cross-entropy on its path), without TRL's
                # per-step entropy / token-accuracy metrics and their host syncs.
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if _fused_loss_available():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return KilnSFTTrainer


def split_batch(micro: int, accum: int, processes: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) per process, keeping micro x accum x processes = the config's.

    Fewer accumulation steps first (the micro-batch the config sized for memory stays); when they
    don't divide, the largest micro-batch that does.
    """
    effective = micro * accum
    if processes <= 1:
        return micro, accum
    if effective % processes:
        raise ValueError(
            f"training.per_device_batch_size x gradient_accumulation_steps = {effective} sequences per step "
            f"can't be shared evenly by training.num_gpus = {processes} processes; make it a multiple of {processes}"
        )
    if accum % processes == 0:
        return micro, accum // processes
    share = effective // processes
    m = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
    return m, share // m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, processes: int, log_file: str | None = None, allow_cpu: bool = False) -> dict:
    """``train(**spec)`` in ``processes`` DDP processes through ``accelerate launch``; the summary.

    One process per GPU of this job (CUDA_VISIBLE_DEVICES, as SLURM sets it). ``allow_cpu``: run
    the processes on CPU with gloo where there is no CUDA (what the tests do: the same code path).
    """
    import torch

    have = torch.cuda.device_count()
    if have < processes and not (allow_cpu and have == 0):
        raise RuntimeError(
            f"training.num_gpus is {processes} but this job sees {have} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it where {processes} "
            "GPUs are visible (the rule asks a cluster for them as resource `gpu`) or lower training.num_gpus"
        )
    work = Path(tempfile.mkdtemp(prefix="kiln-launch-"))
    spec_file = work / "train.json"
    spec_file.write_text(json.dumps({"train": spec, "log_file": log_file}))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",  # the trainer sets bf16 itself from the compute dtype
        "--dynamo_backend",
        "no",
        str(Path(__file__).resolve().parent / "ddp" / "worker.py"),
        str(spec_file),
    ]
    log.info("launching %d processes: %s", processes, " ".join(cmd))
    rc = subprocess.run(cmd, check=False).returncode
    shutil.rmtree(work, ignore_errors=True)
    if rc:
        raise RuntimeError(
            f"accelerate launch of {processes} training processes exited with status {rc}; "
            f"each process's error is printed above{f' and in {log_file}' if log_file else ''}"
        )
    return json.loads(Path(spec["summary_path"]).read_text())


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
    train(**spec["train"])
    # Leave without tearing torch.distributed down: freeing a gloo process group can deadlock (its
    # destructor joins its worker threads holding the GIL that a worker needs to free a tensor),
    # seen here as a rank that never exited. Everything this process wrote is closed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
