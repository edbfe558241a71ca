"""Merge a LoRA adapter into its base model and prove the merged model is the same function.

Idempotent: what the adapter was trained against (base model folder, quantization, compute dtype)
is read from the ``experiment.json`` training saved beside it; the merge settings (onto, dtype) are
the rule's. The policy is recorded: merge onto the original 16-bit weights, or onto the
NF4-dequantized weights the adapter was trained against (for a plain-LoRA adapter, with no 4-bit
base, the two are the same weights: "original" is used and the report says why).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.dtypes import saved_dtype
from kiln.evidence import write_report
from kiln.progress import Phases
from kiln.prompts import check_prompt, validation_prompts
from kiln.spec import MergeSettings
from kiln.trained import TrainedAdapter

log = logging.getLogger(__name__)


PHASES = ["load base + adapter", "reference logits", "merge + save", "reload + logit check", "pipeline check"]
MAX_MERGE_ERROR_RATIO = 0.05  # merge error relative to the adapter's own effect on the logits


def load_base(base_dir: str, onto: str, device: str):
    """The base model in float32: its original weights, or the NF4 round trip of them."""
    import torch
    from transformers import AutoModelForCausalLM

    if onto == "original":
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    from kiln.backends import bnb_config

    quantized = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, quantization_config=bnb_config(torch.float32), device_map={"": device}
    )
    return quantized.dequantize().to(torch.float32)


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def _error_ratio(logits, reference, effect: float) -> float:
    """Mean |logit difference| from base + adapter, as a share of the adapter's own effect."""
    return (logits - reference).abs().mean().item() / effect if effect > 0 else 0.0


def _saving_dtype(merged, batch, mask, reference, effect: float, requested: str, resolved):
    """(dtype to save in, why, rounding error ratio at the resolved dtype or None). The merged
    float32 weights are rounded to ``resolved`` in place and checked; under ``auto``, when that
    rounding alone exceeds the limit, the float32 weights are put back and saved instead."""
    import torch

    if resolved == torch.float32:
        return resolved, f"merge.dtype: {requested}", None
    keep = {k: v.detach().to("cpu", copy=True) for k, v in merged.state_dict().items()} if requested == "auto" else None
    merged.to(resolved).to(torch.float32)  # the saved weights' values, computed in float32
    rounded = _error_ratio(_logits(merged, batch)[mask], reference, effect)
    name = str(resolved).removeprefix("torch.")
    if keep is not None and rounded > MAX_MERGE_ERROR_RATIO:
        merged.load_state_dict(keep)
        return torch.float32, f"auto: rounding to {name} alone would be {rounded:.1%} of the adapter's effect", rounded
    why = f"merge.dtype: {requested}" + (" (the base model's saved dtype)" if requested == "auto" else "")
    return resolved, why, rounded


def _merge_onto(trained: TrainedAdapter, settings: MergeSettings) -> str:
    """The weights to merge onto: a plain-LoRA adapter (no 4-bit base) has only the original ones."""
    if settings.onto == "dequantized" and not trained.quantized:
        log.info("adapter trained without quantization: merging onto the original weights it was trained against")
        return "original"
    return settings.onto


def _merge_and_save(model, ref: tuple, settings: MergeSettings, base_dir: str, out_dir: str, tokenizer):
    """Merge, check the merge's own error (float32) apart from the saving dtype's rounding (a
    small adapter's effect on the logits can be smaller than bfloat16's rounding of the merged
    weights), save. Returns (own error ratio, saved dtype, why, rounding error ratio)."""
    from transformers import GenerationConfig

    batch, mask, ref_logits, effect = ref  # the inputs, which logits count, base + adapter's, its effect
    merged = model.merge_and_unload()  # float32, as loaded
    own = _error_ratio(_logits(merged, batch)[mask], ref_logits, effect)
    resolved = saved_dtype(settings.dtype, base_dir)
    save_dtype, why, rounded = _saving_dtype(merged, batch, mask, ref_logits, effect, settings.dtype, resolved)
    merged = merged.to(save_dtype)
    merged.generation_config = GenerationConfig.from_pretrained(base_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    return own, save_dtype, why, rounded


def _pipeline_check(out_dir: str, dataset_dir: str, tokenizer, eos_id, device: str) -> dict:
    """The merged folder must work with the plain transformers API, and stop at the end of a turn."""
    from transformers import GenerationConfig, pipeline

    prompt, budget = check_prompt(dataset_dir, tokenizer)
    generator = pipeline("text-generation", model=out_dir, tokenizer=out_dir, device=device)
    # one GenerationConfig (the saved one, greedy): loose arguments beside the model's own config
    # made transformers warn twice on every call
    config = GenerationConfig.from_pretrained(out_dir, max_new_tokens=budget, do_sample=False)
    config.max_length = None
    full = generator(prompt, generation_config=config, return_tensors=True)[0]["generated_token_ids"]
    out = list(full)[len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) :]
    eos_ids = set(eos_id if isinstance(eos_id, list) else [eos_id])
    return {
        "pipeline_prompt": prompt[-300:],
        "pipeline_new_token_budget": budget,
        "pipeline_generated_tokens": len(out),
        "pipeline_stopped_at_eos": bool(out and out[-1] in eos_ids),
    }


def _drift_error(report: dict, kept: str) -> RuntimeError:
    own, ratio = report["merge_error_ratio_float32"], report["merge_error_ratio"]
    effect = report["adapter_effect_mean_abs_logit"]
    if own <= MAX_MERGE_ERROR_RATIO:
        cause = (
            f"the merge itself is within {own:.1%} in float32: rounding the merged weights to "
            f"{report['saved_dtype']} for saving is what exceeds the {MAX_MERGE_ERROR_RATIO:.0%} limit (an "
            "adapter this small: a short run, or plain LoRA). Set merge.dtype: float32 (merge.dtype: auto "
            "saves float32 where this happens)"
        )
    else:
        cause = f"the merge itself differs by {own:.1%} in float32, before any rounding for saving"
    return RuntimeError(
        f"merged model does not match base + adapter: mean |logit diff| {report['mean_abs_logit_diff']:.4g} is "
        f"{ratio:.1%} of the adapter's own effect ({effect:.4g}); {cause}. Every check: {kept}"
    )


def merge_adapter(
    adapter_dir: str,
    out_dir: str,
    report_path: str,
    dataset_dir: str,
    settings: MergeSettings | None = None,
    n_samples: int = 8,
    log_path: str | None = None,
) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or MergeSettings()
    trained = TrainedAdapter.read(adapter_dir)
    base_dir = trained.base_dir(adapter_dir)
    onto = _merge_onto(trained, settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    phases = Phases(f"merge {Path(adapter_dir).parent.name}", PHASES)

    with phases.step("load base + adapter"):
        model = PeftModel.from_pretrained(load_base(base_dir, onto, device), adapter_dir).eval()
    texts = validation_prompts(dataset_dir, tokenizer, n_samples)
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    mask = batch["attention_mask"].bool()
    with phases.step("reference logits"):
        with model.disable_adapter():
            base_logits = _logits(model, batch)[mask]
        ref_logits = _logits(model, batch)[mask]
    effect = (ref_logits - base_logits).abs().mean().item()
    with phases.step("merge + save"):
        ref = (batch, mask, ref_logits, effect)
        own, save_dtype, why, rounded = _merge_and_save(model, ref, settings, base_dir, out_dir, tokenizer)
        del model
    with phases.step("reload + logit check"):
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
        diff = (_logits(reloaded, batch)[mask] - ref_logits).abs()
    eos_id = reloaded.generation_config.eos_token_id
    with phases.step("pipeline check"):
        pipeline_check = _pipeline_check(out_dir, dataset_dir, tokenizer, eos_id, device)
    phases.close()
    ratio = diff.mean().item() / effect if effect > 0 else 0.0
    report = {
        "adapter": str(adapter_dir),
        "base_model_dir": base_dir,
        "merge_onto": onto,
        "merge_onto_requested": settings.onto,
        "trained_quantization": trained.quantization,
        "trained_compute_dtype": trained.compute_dtype,
        "saved_dtype": str(save_dtype).removeprefix("torch."),
        "saved_dtype_reason": why,
        "merge_error_ratio_float32": own,
        "rounding_error_ratio": rounded,
        "samples": len(texts),
        "tokens_compared": int(mask.sum()),
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "adapter_effect_mean_abs_logit": effect,
        "merge_error_ratio": ratio,
        **pipeline_check,
        "eos_token": tokenizer.eos_token,
        "generation_eos_token_id": eos_id,
    }
    kept = write_report(report, report_path, log_path, failed=ratio > MAX_MERGE_ERROR_RATIO)
    if ratio > MAX_MERGE_ERROR_RATIO:
        raise _drift_error(report, kept)
    what = "merged %s onto %s weights: max |diff| %.3g, error %.2f%% of the adapter effect"
    log.info(what, adapter_dir, onto, report["max_abs_logit_diff"], 100 * ratio)
    return report
