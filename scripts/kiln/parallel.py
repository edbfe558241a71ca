"""training.parallel: fsdp (issue 29): the Trainer's FSDP2 through accelerate, on GPUs and, for the
tests, on CPU processes with gloo.

The processes are the DDP ones (kiln.launch: ``accelerate launch``, one per GPU, on one machine or
several); what changes is how they hold the model. ``fsdp_args`` turns FSDP2 on in TRL's config:
each decoder layer (the model's ``_no_split_modules``, TRANSFORMER_BASED_WRAP) and, by transformers'
PEFT policy, each LoRA layer is a unit; parameters are resharded after each forward; the adapter is
gathered whole when saved (FULL_STATE_DICT). The 4-bit base is stored as the compute dtype
(kiln.backends.bnb_config), since FSDP shards only floating-point tensors.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def fsdp_args(parallel: str, world: int) -> dict:
    """TrainingArguments' FSDP settings for ``training.parallel`` on ``world`` processes ({} for ddp)."""
    if parallel != "fsdp" or world < 2:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def _cpu_fsdp(trainer) -> None:
    """FSDP on CPU processes (gloo), what the CPU tests run: accelerate enables its FSDP plugin only for
    GPU-like process groups (AcceleratorState leaves MULTI_CPU as plain DDP), while PyTorch's FSDP2
    (``fully_shard``) runs on CPU tensors with gloo. The state is switched to FSDP with the plugin the
    Trainer built from its arguments; from there the Trainer's own FSDP path runs unchanged (accelerate's
    ``fsdp2_prepare_model``, FSDP checkpoints and their resume, the full state dict at save)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    # AcceleratorState copies PartialState's fields each time it is made: both say FSDP
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def enable_fsdp(trainer, parallel: str, world: int, dtype) -> bool:
    """After the trainer is built: FSDP on (CPU processes included) where ``parallel`` asks for it,
    logged with its units and state-dict type. Whether FSDP runs."""
    import torch

    if parallel == "fsdp" and world > 1 and not torch.cuda.is_available():
        _cpu_fsdp(trainer)
    if not trainer.is_fsdp_enabled:
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    policy = plugin.auto_wrap_policy
    log.info(
        "FSDP%s over %d processes: %s units, state dict %s, base stored as %s",
        plugin.fsdp_version,
        world,
        policy.__name__ if callable(policy) else policy,
        plugin.state_dict_type,
        dtype,
    )
    return True


def gathered_state(trainer) -> dict:
    """The whole model's state gathered onto the main process ({} on the others): a collective, so
    every process calls it; the main process saves the adapter's part of it."""
    return trainer.accelerator.get_state_dict(trainer.model)
