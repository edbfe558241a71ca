"""Training backends: which stack loads the model for QLoRA, and why it was chosen.

``hf``: transformers + bitsandbytes NF4 + PEFT LoRA (TRL wraps the model). ``unsloth``: Unsloth's
FastLanguageModel (CUDA only; it patches transformers, so it must be imported first, in this process
only). ``auto`` picks unsloth when CUDA is present and unsloth imports, else hf. Unsloth trains
on one GPU: with several processes (DDP) ``auto`` picks hf and says so, and ``unsloth`` is refused.
"""

from __future__ import annotations

import importlib.util
import logging

from kiln.spec import TrainingSettings

log = logging.getLogger(__name__)


def resolve_backend(requested: str, processes: int = 1) -> tuple[str, str]:
    """Return (backend, reason). ``processes``: how many data-parallel processes train together."""
    import torch

    cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "hf":
        return "hf", "requested in config"
    if processes > 1:
        if requested == "unsloth":
            raise RuntimeError(
                f"training.backend is 'unsloth' but training.num_gpus is {processes}: Unsloth trains on one GPU; "
                "set training.backend: auto (or hf) for data-parallel training, or training.num_gpus: 1"
            )
        return "hf", f"auto: {processes} processes (DDP through accelerate); Unsloth trains on one GPU"
    if requested == "unsloth":
        if not cuda or not has_unsloth:
            raise RuntimeError(
                "training.backend is 'unsloth' but "
                + ("CUDA is not available" if not cuda else "the package 'unsloth' is not installed")
                + "; install the `gpu` extra on a CUDA machine, or set training.backend: auto"
            )
        return "unsloth", "requested in config"
    if cuda and has_unsloth:
        return "unsloth", "auto: CUDA is available and unsloth is installed"
    return "hf", "auto: " + ("unsloth is not installed" if cuda else "no CUDA device (CPU run)")


def lora_config(s: TrainingSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=s.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def bnb_config(dtype, storage=None):
    """NF4 + double quantization, ``dtype`` compute. ``storage``: the dtype the packed 4-bit values are
    held in (default uint8); FSDP shards only floating-point tensors, so an FSDP run stores them as
    the compute dtype (the approach bitsandbytes and Answer.AI document for FSDP + QLoRA: the same
    4-bit values, viewed as other bytes)."""
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        **extra,
    )


def load_hf(base_dir: str, s: TrainingSettings, dtype, attn_implementation: str | None = None):
    """(model, peft_config): TRL applies the LoRA config (and k-bit preparation) itself.
    ``attn_implementation``: packed training's kernel (kiln.packing.plan_attention), else the model's default."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if s.quantization == "nf4":
        kwargs["quantization_config"] = bnb_config(dtype, storage=dtype if s.parallel == "fsdp" else None)
    kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    return model, lora_config(s)


def load_unsloth(base_dir: str, s: TrainingSettings, dtype, max_seq_len: int):
    """(model, None): the model comes back already wrapped with LoRA by Unsloth."""
    from unsloth import FastLanguageModel  # noqa: I001 (must precede transformers in this process)

    model, _ = FastLanguageModel.from_pretrained(
        model_name=base_dir, max_seq_length=max_seq_len, dtype=dtype, load_in_4bit=s.quantization == "nf4"
    )
    target = s.target_modules
    if target == "all-linear":
        target = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(
        model,
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=target,
        bias="none",
        random_state=s.seed,
        use_gradient_checkpointing="unsloth" if s.gradient_checkpointing else False,
    )
    return model, None


def load_for_training(backend: str, base_dir: str, settings, dtype, max_seq_len: int, attn_implementation=None):
    if backend == "unsloth":
        return load_unsloth(base_dir, settings, dtype, max_seq_len)
    return load_hf(base_dir, settings, dtype, attn_implementation)


# ---- training.lora_gemms: kiln.fused_lora on Unsloth ------------------------------------------------

# What auto picks on Unsloth: set from the device measurement (benchmarks/train_gpu.py --part g*,
# docs/scaling.md); until a card has shown the fused path faster at the same loss, auto keeps Unsloth's.
AUTO_FUSED = False


def resolve_lora_gemms(choice: str, backend: str, lora_dropout: float) -> tuple[str, str]:
    """training.lora_gemms resolved for this run: ("fused" or "separate", why)."""
    if choice == "separate":
        return "separate", "training.lora_gemms: separate"
    where = []
    if backend != "unsloth":
        where.append(f"the backend is {backend} (the fused GEMMs go where Unsloth's decoder layers call them)")
    if lora_dropout:
        where.append("lora_dropout > 0 (the fused functions have no dropout)")
    if where:
        if choice == "fused":
            raise ValueError(f"training.lora_gemms: fused can't run here: {'; '.join(where)} (set auto or separate)")
        return "separate", "the backend's own: " + "; ".join(where)
    if choice == "fused":
        return "fused", "training.lora_gemms: fused"
    if AUTO_FUSED:
        return "fused", "auto: Unsloth on a CUDA card, plain LoRA (faster at the same loss: docs/scaling.md)"
    return "separate", "auto: Unsloth's own (the fused GEMMs are not yet measured faster on a card: docs/scaling.md)"


def install_fused_lora(model) -> dict:
    """kiln.fused_lora.install on a loaded Unsloth model (torch-level code, imported only here); what it fused."""
    from kiln.fused_lora import install

    done = install(model)
    log.info("fused LoRA GEMMs on %s", done)
    return done
