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
import math
import re
import time
from pathlib import Path

from kiln.metrics import (
    MODELS,
    below_base_warning,
    check_main_metric,
    detect_task,
    label_scores,
    published_check,
    published_warning,
    resolve_main_metric,
    task_metrics,
)
from kiln.progress import progress
from kiln.spec import EvaluateSettings, read_adapter_spec

log = logging.getLogger(__name__)

GGUF_SLOTS = 8  # requests llama.cpp decodes in parallel when it evaluates a GGUF file


def parse_json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


class _WordTokenizer:
    """Lower-cased Unicode word runs. rouge-score's default tokenizer keeps only ASCII letters and
    digits, so a German answer loses its umlaut words and a Chinese one scores 0 against itself."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure over rows (rouge-score, Google's reimplementation of ROUGE-1.5.5)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / max(1, len(scores))


def length_stats(predictions: list[str], references: list[str]) -> dict:
    """Answer lengths in words: a tuned model that rambles or stops short shows here, not in chrF."""
    pred = [len(_WordTokenizer.tokenize(p)) for p in predictions]
    ref = [len(_WordTokenizer.tokenize(r)) for r in references]
    n = max(1, len(pred))
    return {
        "prediction_words_mean": sum(pred) / n,
        "reference_words_mean": sum(ref) / n,
        "ratio": sum(pred) / max(1, sum(ref)),
        "empty_predictions": sum(1 for p in predictions if not p.strip()),
    }


def score(predictions: list[str], references: list[str], task: str | None = None) -> dict:
    """Task metrics (kiln.metrics.TASK_METRICS): json: exact match, valid JSON, field accuracy;
    label: accuracy, macro-F1, per-label counts, confusion; chat: exact match, chrF, ROUGE-L and
    answer lengths; text: none from generation (its perplexity comes from the loss; its
    continuations are samples). Without a task: json or chat, by the references."""
    n = len(references)
    refs = [parse_json(r) for r in references]
    if task is None:
        task = "json" if n > 0 and all(isinstance(r, dict) for r in refs) else "chat"
    out: dict = {"n": n}
    if task == "text" or n == 0:
        return out
    if task == "label":
        return {**out, **label_scores(predictions, references)}
    if task == "json":
        preds = [parse_json(p.strip()) for p in predictions]
        out["exact_match"] = sum(p == r for p, r in zip(preds, refs, strict=True)) / n
        out["valid_json"] = sum(isinstance(p, dict) for p in preds) / n
        fields = sorted({k for r in refs for k in r})
        out["field_accuracy"] = {
            f: sum(isinstance(p, dict) and p.get(f) == r.get(f) for p, r in zip(preds, refs, strict=True)) / n
            for f in fields
        }
        out["mean_field_accuracy"] = sum(out["field_accuracy"].values()) / max(1, len(fields))
    else:
        from sacrebleu.metrics import CHRF

        out["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n
        out["chrf"] = CHRF().corpus_score(predictions, [references]).score
        out["rouge_l"] = rouge_l(predictions, references)
        out["length"] = length_stats(predictions, references)
    return out


def continuation_prompts(test, tokenizer, count: int, prefix_tokens: int = 64, reference_tokens: int = 64):
    """A text task's samples: the first held-out documents cut after half their tokens (at most
    prefix_tokens), each model continues the prefix, and the document's own next tokens are the
    reference. Greedy, like every generation here, so reruns and repro compare exactly."""
    prompts, refs, rows = [], [], []
    for row in test:
        if len(prompts) >= count:
            break
        if row["kind"] != "text":
            continue
        ids = tokenizer(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
        if len(ids) < 4:
            continue
        cut = min(prefix_tokens, len(ids) // 2)
        prompts.append(tokenizer.decode(ids[:cut]))
        refs.append(tokenizer.decode(ids[cut : cut + reference_tokens]))
        rows.append(row)
    return prompts, refs, rows


def prompts_and_references(test, tokenizer, max_samples: int):
    """Each chat row's turns before its final answer, rendered for generation, and that answer."""
    prompts, refs, rows = [], [], []
    for row in test.select(range(min(max_samples, len(test)))):
        if row["kind"] != "chat":
            continue
        prompts.append(tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True))
        refs.append(row["messages"][-1]["content"])
        rows.append(row)
    return prompts, refs, rows


def evaluation_prompts(test, tokenizer, settings) -> list[str]:
    """The prompts evaluation generates from: the chat rows' prompts, or (no chat rows: a text
    task) the continuation prompts. The GGUF export checks its token ids on exactly these."""
    s = EvaluateSettings.coerce(settings)
    prompts, _, _ = prompts_and_references(test, tokenizer, s.max_samples)
    if not prompts:
        prompts, _, _ = continuation_prompts(test, tokenizer, s.continuations)
    return prompts


def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, desc: str = "") -> list[str]:
    """Batched greedy generation (left padding), stopping at the end-of-turn token."""
    import torch

    tokenizer.padding_side = "left"
    outputs = []
    bar = progress(len(prompts), f"evaluate {desc}: generation".replace("  ", " "))
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        bar.update(len(prompts[i : i + batch_size]))
    bar.close()
    return outputs


def masked_loss(model, tokenized_test, pad_id: int, batch_size: int = 16) -> dict:
    """Mean negative log-likelihood of the trainable (assistant) tokens, and its perplexity."""
    import torch

    from kiln.trainer import summed_nll, takes_logits_to_keep

    selective = takes_logits_to_keep(model)
    total, count = 0.0, 0
    for i in range(0, len(tokenized_test), batch_size):
        rows = tokenized_test[i : i + batch_size]
        length = max(len(x) for x in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), length), pad_id)
        labels = torch.full_like(ids, -100)
        attn = torch.zeros_like(ids)
        for j, (x, m) in enumerate(zip(rows["input_ids"], rows["assistant_masks"], strict=True)):
            ids[j, : len(x)] = torch.tensor(x)
            attn[j, : len(x)] = 1
            labels[j, : len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
        shift = labels[:, 1:]
        # Only the positions whose next token is scored go through the LM head (the union over the
        # batch's rows): the answer tokens, not the prompt (see kiln.trainer.labelled_positions_loss).
        keep = (shift != -100).any(dim=0).nonzero().squeeze(1) if selective else None
        if keep is not None and keep.numel() == 0:
            continue
        with torch.no_grad():
            extra = {"logits_to_keep": keep.to(model.device)} if keep is not None else {}
            logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), **extra).logits
        logits = logits if keep is not None else logits[:, :-1]
        nll, scored = summed_nll(logits, (shift[:, keep] if keep is not None else shift).to(model.device))
        total += nll.item()
        count += int(scored)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": count}


def shared_prompt_rows(tokenized_test, prompts: list[str], rows, tokenizer) -> list[tuple] | None:
    """(prompt ids, answer ids, answer mask) for each generated row when its tokenized test row is
    that prompt's tokens followed by the answer: the loss forward then holds the prompt, and
    generation continues from its cache (kiln.evaluate.loss_and_generate). None where they do not
    line up (other rows scored than generated, a truncated prompt): each is computed on its own."""
    if len(tokenized_test) != len(prompts) or not prompts:
        return None
    if "kiln_id" in tokenized_test.column_names and list(tokenized_test["kiln_id"]) != [r["kiln_id"] for r in rows]:
        return None
    out = []
    for prompt, ids, mask in zip(prompts, tokenized_test["input_ids"], tokenized_test["assistant_masks"], strict=True):
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(head)
        if not 0 < n < len(ids) or list(ids[:n]) != head or any(mask[:n]):
            return None
        out.append((head, list(ids[n:]), list(mask[n:])))
    return out


def _plain_cache(cache) -> bool:
    """A cache whose every layer is a plain full-attention one: cropping it gives the prompt's own."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def loss_and_generate(
    model, tokenizer, shared: list[tuple], batch_size: int, max_new_tokens: int, desc: str = ""
) -> tuple[dict, list[str]]:
    """masked_loss and generate in one pass over each batch: the prompts, left-padded to one length,
    then the reference answers. One forward scores the answers (their positions only through the
    LM head) and leaves the prompts' keys and values in the cache; greedy generation continues
    from there, so no prompt is run through the model twice (the prompt forward was a fifth of an
    HF model's evaluation on the 2-core CPU). Models whose cache is not plain full attention
    (sliding windows, linear attention) prefill the prompts again."""
    import torch

    from kiln.trainer import summed_nll, takes_logits_to_keep

    selective = takes_logits_to_keep(model)
    pad = tokenizer.pad_token_id
    total, count, outputs = 0.0, 0, []
    bar = progress(len(shared), f"evaluate {desc}: loss and generation".replace("  ", " "))
    for i in range(0, len(shared), batch_size):
        chunk = shared[i : i + batch_size]
        P = max(len(p) for p, _, _ in chunk)
        A = max(len(a) for _, a, _ in chunk)
        ids = torch.full((len(chunk), P + A), pad)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (p, a, m) in enumerate(chunk):
            ids[j, P - len(p) : P] = torch.tensor(p)
            ids[j, P : P + len(a)] = torch.tensor(a)
            attn[j, P - len(p) : P + len(a)] = 1
            labels[j, P : P + len(a)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(a), -100)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        shift = labels[:, 1:]
        keep = (shift != -100).any(dim=0).nonzero().squeeze(1)
        dev = model.device
        with torch.no_grad():
            out = model(
                input_ids=ids.to(dev),
                attention_mask=attn.to(dev),
                position_ids=positions.to(dev),
                use_cache=True,
                **({"logits_to_keep": keep.to(dev)} if selective else {}),
            )
        logits = out.logits if selective else out.logits[:, keep]
        nll, scored = summed_nll(logits, shift[:, keep].to(dev))
        total += nll.item()
        count += int(scored)
        cache = out.past_key_values
        del out, logits
        extra = {}
        if _plain_cache(cache):
            cache.crop(-(A + 1))  # the prompts' keys and values, all but the last prompt token's
            extra["past_key_values"] = cache
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids[:, :P].to(dev),
                attention_mask=attn[:, :P].to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                **extra,
            )
        outputs += tokenizer.batch_decode(gen[:, P:], skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": count}, outputs


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


def run_lm_eval(model, tokenizer, settings: dict, batch_size: int) -> dict:
    """EleutherAI's lm-evaluation-harness on one loaded model (opt-in: evaluate.lm_eval.tasks).

    The harness's own HFLM wraps the model object Kiln already loaded (no second load, and the
    merged model is scored as saved); tasks come from the harness's registry or, offline, from
    task YAML files under `include_path`. Returns {task: {metric: value}} from its results.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError(
            f"evaluate.lm_eval.tasks needs lm-evaluation-harness ({exc}): pip install -e '.[lm-eval]'"
        ) from None
    include = settings.get("include_path") or None
    manager = TaskManager(include_path=str(Path(include).resolve()) if include else None)
    unknown = [t for t in settings["tasks"] if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else " (set evaluate.lm_eval.include_path for your own task files)"
        raise ValueError(
            f"evaluate.lm_eval.tasks: {unknown[0]!r} is not a task of lm-eval {lm_eval.__version__}{where}"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(settings["tasks"]),
        num_fewshot=settings.get("num_fewshot") or None,
        limit=settings.get("limit") or None,
        task_manager=manager,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, values in out["results"].items()
    }


def load_model(kind: str, base_dir: str, merged_dir: str, adapter_dir: str):
    """base, base_4bit (the base quantized as training quantized it, no adapter), tuned (merged) or
    adapter_4bit: the adapter on the base as it was trained (NF4 unless the adapter's
    experiment.json says it was trained without quantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if kind == "base":
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    if kind == "tuned":
        return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(device).eval()
    from peft import PeftModel

    from kiln.backends import bnb_config

    quantized = read_adapter_spec(adapter_dir)["quantization"] == "nf4"
    extra = {"quantization_config": bnb_config(dtype)} if quantized else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": device}, **extra)
    if kind == "base_4bit":
        return base.eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def evaluate(
    dataset_dir: str,
    tokenized_dir: str,
    base_dir: str,
    merged_dir: str,
    adapter_dir: str,
    metrics_path: str,
    samples_path: str,
    settings: dict,
    experiment: str = "",
    models: tuple[str, ...] = MODELS,
    regression: dict[str, str] | None = None,
    gguf: dict[str, str] | None = None,
) -> dict:
    """`regression`: name -> tokenized dataset of each regression set, scored by loss and perplexity
    on (at most max_samples of) its rows, test split first, with every model."""
    import datasets

    datasets.disable_caching()  # no cache-*.arrow files written into another rule's output
    from transformers import AutoTokenizer

    s = EvaluateSettings.coerce(settings)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    test = datasets.load_from_disk(dataset_dir)["test"]
    tokenized_test = datasets.load_from_disk(tokenized_dir)["test"]
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
    metrics: dict = {
        "experiment": experiment,
        "task": task,
        "task_reason": why,
        "test_rows": len(test),
        "generated_rows": len(prompts),
    }
    regression_sets = {name: regression_rows(path, s.max_samples) for name, path in (regression or {}).items()}
    if regression_sets:
        metrics["regression"] = {name: {"rows": len(rows)} for name, rows in regression_sets.items()}
    if read_adapter_spec(adapter_dir)["quantization"] != "nf4":  # no 4-bit base: base_4bit is the base
        models = tuple(k for k in models if k != "base_4bit")
    outputs = {}
    shared = shared_prompt_rows(tokenized_test, prompts, rows, tokenizer) if task != "text" else None
    for kind in models:
        t0 = time.perf_counter()
        model = load_model(kind, base_dir, merged_dir, adapter_dir)
        if shared is not None:
            m, outputs[kind] = loss_and_generate(model, tokenizer, shared, s.batch_size, s.max_new_tokens, kind)
        else:
            m = masked_loss(model, tokenized_test, tokenizer.pad_token_id)
            outputs[kind] = generate(model, tokenizer, prompts, s.batch_size, s.max_new_tokens, kind) if prompts else []
        m.update(score(outputs[kind], refs, task))
        if task == "text":
            m["continuations"] = len(prompts)
        m["eval_seconds"] = round(time.perf_counter() - t0, 1)
        metrics[kind] = m
        if s.lm_eval["tasks"] and kind in ("base", "tuned"):  # the harness, opt-in: base vs tuned
            metrics.setdefault("lm_eval", {"tasks": list(s.lm_eval["tasks"])})
            metrics["lm_eval"][kind] = run_lm_eval(model, tokenizer, s.lm_eval, s.batch_size)
        for name, regression_set in regression_sets.items():
            metrics["regression"][name][kind] = masked_loss(model, regression_set, tokenizer.pad_token_id)
        log.info("%s: loss %.4f", kind, m["loss"])
        del model
    for qtype, path in (gguf or {}).items():  # the exported files, in llama.cpp, same rows and scoring
        from kiln.llamacpp import LlamaCpp
        from kiln.llamacpp import generate as generate_gguf

        t0 = time.perf_counter()
        # Each slot holds one prompt and its answer; eight decode together (64 default-task prompts
        # on the 2-core CPU: 34.7 s one at a time, 17.5 s in 8 slots, 16.9 s in 16, the same answers).
        longest = max((len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=0)
        with LlamaCpp(path, n_ctx=max(256, longest + s.max_new_tokens + 16), slots=GGUF_SLOTS) as server:
            outputs[f"gguf_{qtype}"], speed = generate_gguf(
                server, prompts, s.max_new_tokens, tokenizer.eos_token, f"gguf_{qtype}"
            )
        m = score(outputs[f"gguf_{qtype}"], refs, task)
        m.update({k: v for k, v in speed.items() if v is not None})
        if "tuned" in outputs:  # the export's drift: generations that differ from the merged model's
            same = sum(a == b for a, b in zip(outputs[f"gguf_{qtype}"], outputs["tuned"], strict=True))
            m["identical_to_tuned"] = same / max(1, len(prompts))
        m["eval_seconds"] = round(time.perf_counter() - t0, 1)
        metrics[f"gguf_{qtype}"] = m
        log.info("gguf_%s: %s", qtype, {k: v for k, v in m.items() if isinstance(v, float)})
    produced = task_metrics(metrics)
    main = resolve_main_metric(s.main_metric, task)
    check_main_metric(main, produced)
    metrics["main_metric"], metrics["task_metrics"] = main, produced
    if "base" in metrics and "tuned" in metrics:
        metrics["delta_tuned_minus_base"] = {k: metrics["tuned"][k] - metrics["base"][k] for k in ("loss", main)}
    for block in (metrics.get("regression") or {}).values():
        if "base" in block and "tuned" in block:
            block["tuned_minus_base_loss"] = block["tuned"]["loss"] - block["base"]["loss"]
    if "tuned" in metrics and "adapter_4bit" in metrics:
        agree = sum(a == b for a, b in zip(outputs["tuned"], outputs["adapter_4bit"], strict=True))
        metrics["merge_drift"] = {
            "loss_tuned_minus_adapter_4bit": metrics["tuned"]["loss"] - metrics["adapter_4bit"]["loss"],
            "identical_generations": agree / max(1, len(prompts)),
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
    Path(metrics_path).write_text(json.dumps(metrics, indent=2))
    with open(samples_path, "w") as fh:
        for i, (row, ref) in enumerate(zip(rows, refs, strict=True)):
            fh.write(
                json.dumps(
                    {
                        "kiln_id": row["kiln_id"],
                        "prompt": prompts[i] if task == "text" else row["messages"][-2]["content"],
                        # the whole conversation before the answer (system prompt included): the
                        # model card shows the format the model was trained with from it
                        **({} if task == "text" else {"messages": row["messages"][:-1]}),
                        "reference": ref,
                        **{k: outputs[k][i] for k in outputs},
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return metrics
