"""Preference tuning in the workflow (issue 27): what a ``method: dpo`` or ``kto`` experiment needs
of the config, checked when the workflow is parsed (no heavy imports here).

A dpo experiment trains on a dataset of pairs (kiln.pairs), a kto one on pairs or unpaired
prompt/completion/label rows, and both continue the adapter of ``training.from_experiment``, an SFT
experiment on the same base model with the same LoRA shape; its task (what merge, export and
evaluate score the model on) is that SFT experiment's dataset.
"""

from __future__ import annotations

# What the dpo adapter inherits from the SFT one: the adapter's shape and the base it sits on.
ADAPTER_SHAPE = ("quantization", "lora_r", "lora_alpha", "target_modules")
# The source formats and record kinds each preference method trains on (kiln.records)
FORMATS = {"dpo": ("auto", "preference"), "kto": ("auto", "preference", "unpaired"), "orpo": ("auto", "preference")}
KINDS = {"sft": ("chat", "text"), "dpo": ("preference",), "kto": ("preference", "unpaired"), "orpo": ("preference",)}


def preference_problem(cfg: dict, name: str) -> str | None:
    """One line naming the key at fault (after ``experiments.<name>.``), or None."""
    exp = cfg["experiments"][name]
    training = exp["training"]
    if training["method"] == "sft":
        for other, spec in cfg["experiments"].items():
            if spec["training"]["method"] != "sft" and spec["dataset"] == exp["dataset"]:
                return (
                    f"dataset: '{exp['dataset']}' holds the preference pairs experiment '{other}' trains on; "
                    "an sft experiment needs a dataset of answers (another dataset)"
                )
        return None
    method, source = training["method"], training["from_experiment"]
    experiments = cfg["experiments"]
    if not source:
        return None  # kiln.spec.TrainingSettings.check says what is missing
    if source not in experiments:
        return f"training.from_experiment: '{source}' is not in `experiments` (known: {', '.join(sorted(experiments))})"
    sft = experiments[source]
    if sft["training"]["method"] != "sft":
        return (
            f"training.from_experiment: '{source}' is a {sft['training']['method']} experiment; "
            "name the SFT experiment it came from"
        )
    if sft["model"] != exp["model"]:
        return (
            f"training.from_experiment: '{source}' trains model '{sft['model']}', this experiment "
            f"'{exp['model']}'; preference tuning continues the SFT adapter on its own base"
        )
    for key in ADAPTER_SHAPE:
        if sft["training"][key] != training[key]:
            return (
                f"training.{key}: {training[key]!r} differs from '{source}' ({sft['training'][key]!r}); the {method} "
                "adapter continues the SFT one, so they must match (remove it, or use base: " + source + ")"
            )
    unsupported = {
        "backend": training["backend"] == "unsloth",
        "auto_micro_batch": training["auto_micro_batch"],
        "early_stopping_patience": training["early_stopping_patience"] > 0,
    }
    for key, bad in unsupported.items():
        if bad:
            return (
                f"training.{key}: not available with method {method} yet (Kiln runs TRL's trainer "
                "on the hf backend); remove it"
            )
    if exp["tokenize"]["packing"]:
        return f"tokenize.packing: preference rows are not packed (set it false for method {method})"
    for i, src in enumerate(cfg["datasets"][exp["dataset"]]["sources"]):
        if src.get("format", "auto") not in FORMATS[method]:
            what = {
                "dpo": "pairs: format preference (prompt/chosen/rejected) or auto",
                "orpo": "pairs: format preference (prompt/chosen/rejected) or auto",
                "kto": "pairs or labelled answers: format preference, unpaired (prompt/completion/label) or auto",
            }[method]
            return (
                f"dataset: source {i} ('{src['name']}') of '{exp['dataset']}' has format '{src['format']}'; "
                f"method {method} trains on {what}"
            )
    return None


def task_experiment(cfg: dict, name: str) -> str:
    """The SFT experiment whose task a preference experiment's model is scored on (itself for sft)."""
    exp = cfg["experiments"][name]
    return exp["training"]["from_experiment"] if exp["training"]["method"] != "sft" else name


def expected_kinds(cfg: dict, dataset: str) -> list[str]:
    """The record kinds the experiments on ``dataset`` can train on (what every one of them takes): a
    dpo dataset only pairs, a kto one pairs or unpaired rows, an SFT dataset no preference rows
    (collect refuses another row, naming its file and row); [] where any kind goes."""
    methods = {e["training"]["method"] for e in cfg["experiments"].values() if e["dataset"] == dataset}
    if not methods:
        return []  # a regression set, or no experiment trains on it
    kinds = set.intersection(*(set(KINDS[m]) for m in methods))
    return [k for k in ("chat", "text", "preference", "unpaired") if k in kinds]


def wrong_kind(rows: list[dict], kinds: tuple | list, file: str, dataset: str) -> str | None:
    """The collect stage's refusal of the first row of a kind the dataset's experiments can't train
    on (``kinds``: expected_kinds), naming its file and row and what to change; None when all fit."""
    row = next((r for r in rows if kinds and r["kind"] is not None and r["kind"] not in kinds), None)
    if row is None:
        return None
    if "unpaired" in kinds:
        what = (
            "is trained with method kto, which needs answers marked good or bad: give each row prompt, "
            "completion and label, or prompt, chosen and rejected (docs/preference.md)"
        )
    elif "preference" in kinds:
        what = (
            "is trained with method dpo or orpo, which need preference pairs: give each row prompt, chosen and "
            "rejected (docs/preference.md), train unpaired rows with method kto, or train this file with method sft "
            "as another dataset"
        )
    else:
        what = (
            "is trained with method sft, which learns answers, not preference pairs: train pairs with method dpo "
            "or kto from an SFT experiment (docs/preference.md), or give answers (messages, prompt/completion)"
        )
    article = "an" if row["kind"][0] in "aeiou" else "a"
    record = f"{article} {row['kind']} record ({row['format']} format)"
    return f"{file}: row {row['row']}: {record}, but dataset '{dataset}' {what}"
