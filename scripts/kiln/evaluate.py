"""Evaluate base and fine-tuned models side by side on the test split.

Models: ``base`` (the prepared base model), ``tuned`` (the merged model), and ``adapter_4bit`` (the
adapter on the NF4 base, as trained) so drift from merging is visible. Metrics for each: loss and
perplexity on assistant tokens; batched greedy generation scored by the task's metrics
(kiln.metrics.TASK_METRICS): JSON answers exact match, valid-JSON rate and per-field accuracy; labels
accuracy, macro-F1 and a confusion matrix; free text exact match, chrF, ROUGE-L and answer lengths;
plain text perplexity, with greedy continuations of held-out document prefixes as samples.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.dtypes import compute_dtype
from kiln.harness import run_lm_eval
from kiln.metrics import (
    MODELS,
    below_base_warning,
    check_main_metric,
    detect_task,
    published_check,
    published_warning,
    resolve_main_metric,
    task_metrics,
)
from kiln.passes import generate, loss_and_generate, masked_loss, shared_prompt_rows
from kiln.prompts import continuation_prompts, prompts_and_references
from kiln.scoring import score
from kiln.spec import EvaluateSettings
from kiln.trained import TrainedAdapter

log = logging.getLogger(__name__)

GGUF_SLOTS = 8  # requests llama.cpp decodes in parallel when it evaluates a GGUF file


def regression_rows(tokenized_dir: str, max_samples: int):
    """A regression set's first max_samples tokenized rows: test, then validation, then train (a
    regression set is data the experiment does not train on; a file's rows are all in train)."""
    import datasets

    dd = datasets.load_from_disk(tokenized_dir)
    parts = [dd[s] for s in ("test", "validation", "train") if s in dd and len(dd[s])]
    if not parts:
        raise ValueError(f"regression set {tokenized_dir} has no rows")
    from kiln.packing import unpack_rows

    # Tokenized with packing, its train and validation rows are cut back into their documents: each
    # scored as its own row, never attending to the documents packed beside it.
    rows = datasets.concatenate_datasets([unpack_rows(p) for p in parts])
    return rows.select(range(min(max_samples, len(rows))))


@dataclass(frozen=True)
class EvaluationInputs:
    """What evaluation reads: the dataset and its tokens, the model folders, the regression sets
    (config entry -> tokenized dataset) and the GGUF files export_gguf verified (type -> file)."""

    dataset: str
    tokenized: str
    base: str
    merged: str
    adapter: str
    regression: dict[str, str] = field(default_factory=dict)
    gguf: dict[str, str] = field(default_factory=dict)
    # A preference run (training.method dpo): its tokenized pairs, the SFT model it started from
    # (merged) and that experiment's metrics.json; dataset/tokenized above are the SFT task's.
    pairs: str = ""
    sft_merged: str = ""
    sft_metrics: str = ""
    sft_settings: dict | None = None  # the SFT experiment's evaluate settings


def load_model(kind: str, inputs: EvaluationInputs):
    """base, base_4bit (the base quantized as training quantized it, no adapter), tuned (merged) or
    adapter_4bit: the adapter on the base as it was trained (NF4 unless the adapter's
    experiment.json says it was trained without quantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype("auto")  # as training computed (bf16 on a card that has it, else float32)
    if kind == "base":
        return AutoModelForCausalLM.from_pretrained(inputs.base, dtype=dtype).to(device).eval()
    if kind == "tuned":
        return AutoModelForCausalLM.from_pretrained(inputs.merged, dtype=dtype).to(device).eval()
    from peft import PeftModel

    from kiln.backends import bnb_config

    quantized = TrainedAdapter.read(inputs.adapter).quantized
    extra = {"quantization_config": bnb_config(dtype)} if quantized else {}
    base = AutoModelForCausalLM.from_pretrained(inputs.base, dtype=dtype, device_map={"": device}, **extra)
    if kind == "base_4bit":
        return base.eval()
    return PeftModel.from_pretrained(base, inputs.adapter).eval()


@dataclass
class _Run:
    """One evaluation's shared state: the settings, the task, what is generated and scored."""

    s: EvaluateSettings
    tokenizer: object
    task: str
    prompts: list[str]
    refs: list[str]
    rows: list
    tokenized_test: object
    shared: list[tuple] | None
    regression_sets: dict
    outputs: dict = field(default_factory=dict)


def _prepare(inputs: EvaluationInputs, s: EvaluateSettings, metrics: dict) -> _Run:
    """The tokenizer, the test rows, the task and its prompts; the metrics' header filled in."""
    import datasets

    datasets.disable_caching()  # no cache-*.arrow files written into another rule's output
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs.merged)
    test = datasets.load_from_disk(inputs.dataset)["test"]
    tokenized_test = datasets.load_from_disk(inputs.tokenized)["test"]
    tokenized_test = tokenized_test.select(range(min(s.max_samples, len(tokenized_test))))
    if "seq_lengths" in tokenized_test.column_names:  # packed: score each row on its own
        raise ValueError("evaluation needs the unpacked test split; set tokenize.packing only for training")
    prompts, refs, rows = prompts_and_references(test, tokenizer, s.max_samples)
    kinds = test.select(range(min(s.max_samples, len(test))))["kind"] if len(test) else []
    if s.task == "auto":
        task, why = detect_task(kinds, refs)
    else:
        task, why = s.task, "evaluate.task"
    if task == "text":  # scored by perplexity on the held-out documents; continuations are samples
        prompts, refs, rows = continuation_prompts(test, tokenizer, s.continuations)
    log.info("task: %s (%s)", task, why)
    metrics.update(task=task, task_reason=why, test_rows=len(test), generated_rows=len(prompts))
    regression_sets = {name: regression_rows(path, s.max_samples) for name, path in inputs.regression.items()}
    if regression_sets:
        metrics["regression"] = {name: {"rows": len(rows)} for name, rows in regression_sets.items()}
    shared = shared_prompt_rows(tokenized_test, prompts, rows, tokenizer) if task != "text" else None
    return _Run(s, tokenizer, task, prompts, refs, rows, tokenized_test, shared, regression_sets)


def _score_model(run: _Run, kind: str, inputs: EvaluationInputs, metrics: dict) -> None:
    """One model loaded, scored (loss, generations, the harness, the regression sets), released."""
    s, tokenizer = run.s, run.tokenizer
    t0 = time.perf_counter()
    model = load_model(kind, inputs)
    if run.shared is not None:
        m, run.outputs[kind] = loss_and_generate(model, tokenizer, run.shared, s.batch_size, s.max_new_tokens, kind)
    else:
        m = masked_loss(model, run.tokenized_test, tokenizer.pad_token_id)
        prompts = run.prompts
        run.outputs[kind] = generate(model, tokenizer, prompts, s.batch_size, s.max_new_tokens, kind) if prompts else []
    m.update(score(run.outputs[kind], run.refs, run.task))
    if run.task == "text":
        m["continuations"] = len(run.prompts)
    m["eval_seconds"] = round(time.perf_counter() - t0, 1)
    metrics[kind] = m
    if s.lm_eval["tasks"] and kind in ("base", "tuned"):  # the harness, opt-in: base vs tuned
        metrics.setdefault("lm_eval", {"tasks": list(s.lm_eval["tasks"])})
        metrics["lm_eval"][kind] = run_lm_eval(model, tokenizer, s.lm_eval, s.batch_size)
    for name, regression_set in run.regression_sets.items():
        metrics["regression"][name][kind] = masked_loss(model, regression_set, tokenizer.pad_token_id)
    log.info("%s: loss %.4f", kind, m["loss"])
    del model


def _score_gguf(run: _Run, qtype: str, path: str, metrics: dict) -> None:
    """An exported file in llama.cpp, on the same rows with the same scoring."""
    from kiln.llamacpp import LlamaCpp
    from kiln.llamacpp import generate as generate_gguf

    s, name = run.s, f"gguf_{qtype}"
    t0 = time.perf_counter()
    # Each slot holds one prompt and its answer; eight decode together (64 default-task prompts
    # on the 2-core CPU: 34.7 s one at a time, 17.5 s in 8 slots, 16.9 s in 16, the same answers).
    longest = max((len(run.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in run.prompts), default=0)
    with LlamaCpp(path, n_ctx=max(256, longest + s.max_new_tokens + 16), slots=GGUF_SLOTS) as server:
        run.outputs[name], speed = generate_gguf(server, run.prompts, s.max_new_tokens, run.tokenizer.eos_token, name)
    m = score(run.outputs[name], run.refs, run.task)
    m.update({k: v for k, v in speed.items() if v is not None})
    if "tuned" in run.outputs:  # the export's drift: generations that differ from the merged model's
        same = sum(a == b for a, b in zip(run.outputs[name], run.outputs["tuned"], strict=True))
        m["identical_to_tuned"] = same / max(1, len(run.prompts))
    m["eval_seconds"] = round(time.perf_counter() - t0, 1)
    metrics[name] = m
    log.info("%s: %s", name, {k: v for k, v in m.items() if isinstance(v, float)})


def _compare_models(run: _Run, metrics: dict, merged_dir: str) -> None:
    """The task's main metric, the deltas between models, the merge drift and the published check."""
    produced = task_metrics(metrics)
    main = resolve_main_metric(run.s.main_metric, run.task)
    check_main_metric(main, produced)
    metrics["main_metric"], metrics["task_metrics"] = main, produced
    if "base" in metrics and "tuned" in metrics:
        metrics["delta_tuned_minus_base"] = {k: metrics["tuned"][k] - metrics["base"][k] for k in ("loss", main)}
    for block in (metrics.get("regression") or {}).values():
        if "base" in block and "tuned" in block:
            block["tuned_minus_base_loss"] = block["tuned"]["loss"] - block["base"]["loss"]
    if "tuned" in metrics and "adapter_4bit" in metrics:
        agree = sum(a == b for a, b in zip(run.outputs["tuned"], run.outputs["adapter_4bit"], strict=True))
        metrics["merge_drift"] = {
            "loss_tuned_minus_adapter_4bit": metrics["tuned"]["loss"] - metrics["adapter_4bit"]["loss"],
            "identical_generations": agree / max(1, len(run.prompts)),
        }
    check = published_check(metrics)
    if check:
        metrics["published_check"] = check
        merge_report = Path(merged_dir).parent / "merge_report.json"
        warning = published_warning(metrics, json.loads(merge_report.read_text()) if merge_report.exists() else None)
        if warning:
            log.warning("\n%s\nWARNING: %s\n%s", "=" * 100, warning, "=" * 100)
    worse = below_base_warning(metrics)
    if worse:
        log.warning("Kiln: WARNING %s", worse)


def _base_scores_of_sft(run: _Run, inputs: EvaluationInputs, metrics: dict) -> tuple[str, ...]:
    """A preference run's base models on the SFT task: the SFT experiment scored the same base on
    the same test rows with the same settings, so its blocks are taken (marked ``scored_in``) rather
    than generated again. Anything else (other settings, regression sets, the harness): scored here."""
    sft = json.loads(Path(inputs.sft_metrics).read_text())
    same = inputs.sft_settings == run.s.to_dict() and sft.get("generated_rows") == metrics["generated_rows"]
    if not same or sft.get("task") != run.task or run.regression_sets or run.s.lm_eval["tasks"]:
        return ()
    kinds = tuple(k for k in ("base", "base_4bit") if k in sft)
    for kind in kinds:
        metrics[kind] = {**sft[kind], "scored_in": sft.get("experiment")}
    log.info(
        "%s: scored by experiment %s on the same rows and settings (its metrics.json)", kinds, sft.get("experiment")
    )
    return kinds


def _score_preferences(run: _Run, inputs: EvaluationInputs, metrics: dict) -> None:
    """Held-out pairs for base, SFT and tuned (kiln.pair_eval), and the SFT model's task metrics
    beside the tuned model's on the same test rows: a preference gain that costs the task shows."""
    from dataclasses import replace

    from kiln.pair_eval import score_pairs

    trained = TrainedAdapter.read(inputs.adapter)

    def load(kind: str):
        return load_model(
            "base" if kind == "base" else "tuned",
            replace(inputs, merged=inputs.sft_merged) if kind == "sft" else inputs,
        )

    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    # the implicit reward against the SFT model: for the methods trained with it as the reference
    beta = None if trained.training.method == "orpo" else trained.training.beta
    metrics["preference"] = {
        "method": trained.training.method,
        "from_experiment": trained.training.from_experiment,
        **score_pairs(load, inputs.pairs, pad, trained.tokenize.max_seq_len, beta),
    }
    sft = json.loads(Path(inputs.sft_metrics).read_text())
    keys = ["loss", *metrics["task_metrics"]]
    metrics["sft"] = {
        "experiment": sft.get("experiment"),
        "generated_rows": sft.get("generated_rows"),
        "same_rows": sft.get("generated_rows") == metrics.get("generated_rows") and sft.get("task") == run.task,
        **{k: sft["tuned"][k] for k in keys if k in sft.get("tuned", {})},
    }
    metrics["delta_tuned_minus_sft"] = {
        k: metrics["tuned"][k] - metrics["sft"][k] for k in ("loss", metrics["main_metric"]) if k in metrics["sft"]
    }


def _write_samples(run: _Run, samples_path: str) -> None:
    with open(samples_path, "w") as fh:
        for i, (row, ref) in enumerate(zip(run.rows, run.refs, strict=True)):
            text = run.task == "text"
            fh.write(
                json.dumps(
                    {
                        "kiln_id": row["kiln_id"],
                        "prompt": run.prompts[i] if text else row["messages"][-2]["content"],
                        # the whole conversation before the answer (system prompt included): the
                        # model card shows the format the model was trained with from it
                        **({} if text else {"messages": row["messages"][:-1]}),
                        "reference": ref,
                        **{k: run.outputs[k][i] for k in run.outputs},
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def evaluate(
    inputs: EvaluationInputs,
    metrics_path: str,
    samples_path: str,
    settings: EvaluateSettings,
    experiment: str = "",
    models: tuple[str, ...] = MODELS,
) -> dict:
    """Every model of `models` (and each GGUF file) scored on the test split; each regression set
    scored by loss and perplexity on (at most max_samples of) its rows, test split first."""
    metrics: dict = {"experiment": experiment}
    run = _prepare(inputs, settings, metrics)
    if not TrainedAdapter.read(inputs.adapter).quantized:  # no 4-bit base: base_4bit is the base
        models = tuple(k for k in models if k != "base_4bit")
    reused = _base_scores_of_sft(run, inputs, metrics) if inputs.pairs else ()
    for kind in models:
        if kind not in reused:
            _score_model(run, kind, inputs, metrics)
    for qtype, path in inputs.gguf.items():
        _score_gguf(run, qtype, path, metrics)
    _compare_models(run, metrics, inputs.merged)
    if inputs.pairs:
        _score_preferences(run, inputs, metrics)
    Path(metrics_path).write_text(json.dumps(metrics, indent=2))
    _write_samples(run, samples_path)
    return metrics
