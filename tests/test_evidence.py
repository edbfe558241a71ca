"""A failed check says what differed, from a file that survives the failed job (issue 24): the merge
check tells the merge's own error from the saving dtype's rounding, and a GGUF whose tokens differ
names the prompt and both token sequences."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file


def small_adapter(tiny_run, folder):
    """The tiny run's adapter with its effect scaled down 1000-fold (lora_B): a short run's adapter,
    whose effect on the logits is smaller than bfloat16's rounding of the merged weights."""
    src = tiny_run.path("tiny/adapter")
    dst = folder / "adapter"
    shutil.copytree(src, dst)
    weights = load_file(dst / "adapter_model.safetensors")
    save_file({k: v * 1e-3 if "lora_B" in k else v for k, v in weights.items()}, dst / "adapter_model.safetensors")
    spec = json.loads((dst / "experiment.json").read_text())
    spec["base_model_relpath"] = os.path.relpath(tiny_run.path("base/tiny"), dst)
    (dst / "experiment.json").write_text(json.dumps(spec))
    return dst


def test_the_merge_check_blames_the_rounding_when_rounding_is_the_cause(tiny_run, tmp_path):
    from kiln.merge import merge_adapter
    from kiln.spec import MergeSettings

    adapter = small_adapter(tiny_run, tmp_path)
    dataset = str(tiny_run.path("data/orders/dataset"))
    log = tmp_path / "logs" / "merge" / "tiny.log"
    with pytest.raises(
        RuntimeError, match=r"the merge itself is within .* in float32: rounding the merged weights"
    ) as e:
        merge_adapter(
            str(adapter),
            str(tmp_path / "bf16"),
            str(tmp_path / "r.json"),
            dataset,
            MergeSettings(dtype="bfloat16"),
            log_path=str(log),
        )
    assert "merge.dtype: float32" in str(e.value) and str(log.with_suffix(".json")) in str(e.value)
    kept = json.loads(log.with_suffix(".json").read_text())  # beside the log: Snakemake keeps it
    assert (
        kept["merge_error_ratio_float32"] <= 0.05 < kept["rounding_error_ratio"] and kept["saved_dtype"] == "bfloat16"
    )
    # auto (the default) saves float32 where rounding alone would exceed the limit, and says why
    report = merge_adapter(
        str(adapter), str(tmp_path / "auto"), str(tmp_path / "a.json"), dataset, MergeSettings(dtype="auto")
    )
    assert report["saved_dtype"] == "float32" and report["saved_dtype_reason"].startswith("auto: rounding to bfloat16")
    assert report["merge_error_ratio"] <= 0.05
    # the tiny run's own adapter: auto keeps the base model's bfloat16
    full = json.loads(tiny_run.path("tiny/merge_report.json").read_text())
    assert full["saved_dtype"] == "bfloat16" and full["rounding_error_ratio"] <= 0.05


def test_a_gguf_whose_tokens_differ_names_the_prompt_and_both_token_sequences(tiny_run, tmp_path, monkeypatch):
    """The tiny merged model with the tokenizer Kiln had before issue 24 (a plain ByteLevel
    pre-tokenizer): llama.cpp splits `\\n\\n6` otherwise, and the failure shows where, from a file
    that survives."""
    import kiln.prompts
    from kiln.export import ExportError, export_gguf
    from kiln.spec import EvaluateSettings, ExportSettings

    merged = tmp_path / "merged"
    shutil.copytree(tiny_run.path("tiny/merged"), merged)
    data = json.loads((merged / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    (merged / "tokenizer.json").write_text(json.dumps(data))
    monkeypatch.setattr(kiln.prompts, "evaluation_prompts", lambda *a: ["How many?\n\n6 plums\n9 lemons", "hi"])
    log = tmp_path / "logs" / "export_gguf" / "tiny-q8_0.log"
    with pytest.raises(ExportError) as e:
        export_gguf(
            str(merged),
            str(tiny_run.path("data/orders/dataset")),
            str(tmp_path / "m.gguf"),
            str(tmp_path / "v.json"),
            "q8_0",
            ExportSettings(),
            EvaluateSettings(),
            str(log),
        )
    text = str(e.value)
    assert "token ids: 1 of 2 prompts differ" in text and "first differing prompt (0): 'How many?\\n\\n6 plums" in text
    assert "Hugging Face ['Ċ', 'Ċ'" in text and "llama.cpp ['ĊĊ'" in text and str(log.with_suffix(".json")) in text
    kept = json.loads(log.with_suffix(".json").read_text())
    assert kept["token_ids"]["differences"][0]["text"].startswith("How many?") and not kept["ok"]
