"""EleutherAI's lm-evaluation-harness as an opt-in evaluation (evaluate.lm_eval), offline: a task
defined in a local YAML file over a local JSONL file, scored on the tiny model."""

from __future__ import annotations

import json

import pytest

from kiln.harness import run_lm_eval

QUESTIONS = [
    ("The kiln fires clay into", ["pottery", "water", "music"], 0),
    ("A cup is made to hold", ["thunder", "tea", "roads"], 1),
    ("Glaze melts into a layer of", ["ice", "paper", "glass"], 2),
    ("The potter shapes clay on a", ["wheel", "cloud", "river"], 0),
]


def write_task(folder):
    """A multiple-choice task in the harness's YAML format over local data (no Hub download)."""
    data = folder / "kiln_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "kiln_mc.yaml").write_text(
        "task: kiln_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def test_a_local_harness_task_scores_a_model_offline(tiny_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_run.path("base/tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    folder = write_task(tmp_path)
    settings = {"tasks": ["kiln_mc"], "include_path": str(folder), "limit": 0, "num_fewshot": 0}
    scores = run_lm_eval(model, tokenizer, settings, batch_size=4)
    acc = scores["kiln_mc"]["acc,none"]
    # A random model: accuracy is a share of the 4 questions, and the same on a second run.
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert run_lm_eval(model, tokenizer, settings, batch_size=2)["kiln_mc"]["acc,none"] == acc
    with pytest.raises(ValueError, match="'no_such_task' is not a task of lm-eval"):
        run_lm_eval(model, tokenizer, {**settings, "tasks": ["no_such_task"]}, batch_size=4)
