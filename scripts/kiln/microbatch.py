"""Micro-batch sizing: the largest that fits the card (effective batch kept), and the per-process split."""

from __future__ import annotations


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
