"""The published model folder (kiln.card.publish): the merged weights, the manifest, and the
model card (README.md) written from the manifest, its snippets executed by tests/test_readme.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kiln.manifest_record import BaseIdentity, CodeVersion, Manifest, PromptExample
from kiln.metrics import label
from kiln.reports import Metrics

# The card's columns: the 4-bit base beside the base where it was scored (quantizing's cost apart
# from the fine-tune's gain), then this model and the adapter as trained.
HEADINGS = {
    "base": "base model",
    "base_4bit": "4-bit base",
    "tuned": "this model",
    "adapter_4bit": "adapter on 4-bit base",
}


def _provenance_commit(code: CodeVersion) -> str:
    commit = code.commit or "not a git checkout"
    if code.dirty:
        commit += f" (uncommitted changes, diff sha256 {(code.diff_sha256 or '')[:16]}…)"
    return commit


def _prompt_lines(example: PromptExample | None) -> tuple[list[str], list[str]]:
    """(the snippet's `messages = ...` lines, the "Prompt format" section): a real test
    conversation in the format the model was trained on, where the manifest has one."""
    if not example:
        return ['messages = [{"role": "user", "content": "..."}]'], []
    listed = ",\n".join(f"    {json.dumps(msg, ensure_ascii=False)}" for msg in example.messages)
    return [f"messages = [\n{listed},\n]"], [
        "## Prompt format",
        "",
        "The model was trained on conversations in the format of the one in the snippet below (a test "
        "row, its system prompt included: leave that out and the answers change). Its expected answer:",
        "",
        "```text",
        example.reference,
        "```",
        "",
    ]


def _front_lines(m: Manifest) -> list[str]:
    """Hub front matter, the title and what the model is."""
    exp, base = m.config.experiment, m.base_model
    method = "4-bit NF4 QLoRA" if exp.training.quantization == "nf4" else "LoRA"
    return [
        "---",
        "library_name: transformers",
        "tags: [kiln, qlora, lora, sft]",
        # The Hub's model tree reads a repo id here; a model with none (a local folder, a random
        # test model) leaves it out rather than write something no tool can resolve.
        *([f"base_model: {base.hub_id}", "base_model_relation: finetune"] if base.hub_id else []),
        "---",
        "",
        f"# {m.experiment}",
        "",
        f"A fine-tune of **{base.hub_id or base.id}** (Kiln model `{exp.model}`) on the Kiln dataset "
        f"`{exp.dataset}`, trained with {method} and merged into the base weights.",
        "",
        f"Base weights: {base_weights_line(base)}",
        "",
    ]


def _load_lines(snippet_messages: list[str]) -> list[str]:
    return [
        "## How to load it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "."  # this folder',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        *snippet_messages,
        "inputs = tokenizer.apply_chat_template(",
        "    messages, add_generation_prompt=True, return_dict=True, return_tensors='pt'",
        ")",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
    ]


def _data_and_training_lines(m: Manifest) -> list[str]:
    exp = m.config.experiment
    tr, run, tok, merged = exp.training, m.training, exp.tokenize, m.merged.report
    return [
        "## Data",
        "",
        "| split | rows | fingerprint (sha256 of ids and content hashes) |",
        "|---|---|---|",
        *[f"| {k} | {v.rows} | `{v.fingerprint}` |" for k, v in m.data.splits.items()],
        "",
        f"Each row keeps its stable id and the source, file and row it came from "
        f"(`kiln trace ID --dataset {exp.dataset}`).",
        "",
        "## Training",
        "",
        f"- backend: {run.backend} ({run.backend_reason}); compute dtype {run.compute_dtype}; device {run.device}",
        f"- LoRA r={tr.lora_r}, alpha={tr.lora_alpha}, dropout={tr.lora_dropout}, targets {tr.target_modules}",
        f"- {run.steps} steps, batch {tr.per_device_batch_size} x {tr.gradient_accumulation_steps}, "
        f"learning rate {tr.learning_rate} ({tr.lr_scheduler}), seed {tr.seed}",
        f"- max_seq_len {tok.max_seq_len}, loss on assistant tokens only: "
        f"{tok.assistant_only_loss}, packing: {tok.packing}",
        f"- tokens trained: {run.tokens_trained}; loss {run.first_loss:.4f} -> {run.final_loss:.4f}",
        f"- merged onto the {merged.merge_onto} weights, saved as {merged.saved_dtype}",
        "",
    ]


def _evaluation_lines(met: Metrics) -> list[str]:
    """The metrics table: every model the card shows, then each GGUF file in llama.cpp."""
    ggufs = list(met.ggufs())
    card_models = ["base", *(["base_4bit"] if met.base_4bit else []), "tuned", "adapter_4bit"]

    def metric_row(key: str, label: str) -> str:
        cells = [met.value(k, key) for k in (*card_models, *ggufs)]
        return f"| {label} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |"

    return [
        f"## Evaluation ({met.generated_rows} test rows, greedy decoding)",
        "",
        f"Main metric: {label(met.main)}.",
        "",
        "| metric | "
        + " | ".join(HEADINGS[k] for k in card_models)
        + " |"
        + "".join(f" {k.removeprefix('gguf_')} GGUF (llama.cpp) |" for k in ggufs),
        "|---|" + "---|" * (len(card_models) + len(ggufs)),
        *[metric_row(name, label(name)) for name in [*met.task_metric_names, "loss"]],
        "",
    ]


def _provenance_lines(m: Manifest) -> list[str]:
    return [
        "## Provenance",
        "",
        f"- code: {_provenance_commit(m.code)}",
        f"- base weights sha256: {json.dumps(m.base_model.weights)}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m.packages.items() if v),
        "- the full record: `manifest.json` in this folder (config, hashes, stage times, hardware)",
        *[f"- **unpinned**: {u}" for u in m.unpinned_inputs()],
        "",
    ]


def model_card(manifest: Manifest) -> str:
    """README.md for the published model, generated from the manifest."""
    m = manifest
    snippet_messages, prompt_format = _prompt_lines(m.prompt_example)
    lines = [
        *_front_lines(m),
        *prompt_format,
        *_load_lines(snippet_messages),
        *_data_and_training_lines(m),
        *_evaluation_lines(m.metrics),
        *regression_card_lines(m.metrics),
        *preference_card_lines(m.metrics),
        *gguf_card_lines(m),
        *_provenance_lines(m),
    ]
    return "\n".join(lines)


def gguf_card_lines(m: Manifest) -> list[str]:
    """The GGUF exports beside this model (in the run's `gguf/` folder): what each is and what its
    verification in llama.cpp found."""
    if not m.gguf:
        return []
    first = next(iter(m.gguf.values()))
    note = first.ollama.note if first.ollama else None
    lines = [
        "## GGUF (llama.cpp, Ollama, LM Studio)",
        "",
        f"Exported by {first.converter.name} {first.converter.version} into the run's `gguf/` folder, with an "
        "Ollama `Modelfile`; each file verified in llama.cpp against this model and scored above.",
        *(["", f"Note: {note}."] if note else []),
        "",
        "| file | size | token ids equal (evaluated prompts) | max next-token probability diff | sha256 |",
        "|---|---|---|---|---|",
    ]
    for r in m.gguf.values():
        t, lp = r.token_ids, r.logprobs
        lines.append(
            f"| `{r.gguf}` | {r.size_mb} MB | {t.identical} of {t.prompts} | "
            f"{lp.max_abs_prob_diff:.3g} (tolerance {lp.tolerance}) | `{r.sha256}` |"
        )
    return [*lines, ""]


def base_weights_line(base: BaseIdentity) -> str:
    """Where the weights the model was trained on came from, in words (not always the Hub's)."""
    if base.kind == "gguf_package":
        (file,) = list(base.source_files) or ["?"]
        return (
            f"the GGUF file `{file}` of the Python package `{base.id.split(':')[0]}`, dequantized "
            f"and saved as {base.dtype} (the rounding of that file's quantization is in them; they "
            "are not the Hub repo's original weights)."
        )
    if base.kind == "hub":
        return f"`{base.id}` at revision `{base.revision}` from the Hugging Face Hub, saved as {base.dtype}."
    if base.kind == "local":
        return f"the local folder `{base.id}`, saved as {base.dtype}."
    return f"`{base.id}` ({base.kind})."


def regression_card_lines(metrics: Metrics) -> list[str]:
    """The model card's regression-set table: what the fine-tune may have cost elsewhere."""
    if not metrics.regression:
        return []
    return [
        "Regression sets (loss on answer tokens; a rise is forgetting):",
        "",
        "| regression set | rows | base model loss | this model loss | tuned - base |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {r.rows} | {r.base.loss:.4f} | {r.tuned.loss:.4f} | {r.tuned_minus_base_loss:+.4f} |"
            for name, r in metrics.regression.items()
        ],
        "",
    ]


def preference_card_lines(metrics: Metrics) -> list[str]:
    """A preference-tuned model's held-out pairs, base -> SFT -> this model, and its task score
    beside the SFT model's (docs/preference.md)."""
    pref = metrics.preference
    if pref is None:
        return []
    cell = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"Preference tuning ({pref.method}, from `{pref.from_experiment}`): {pref.pairs} held-out pairs; "
        "accuracy is the share whose chosen answer this model finds more likely.",
        "",
        "| model | preference accuracy | log-prob margin (nats) | reward margin vs SFT |",
        "|---|---|---|---|",
        *[
            f"| {r['model']} | {cell(r['preference accuracy'], '.3f')} | {cell(r['log-prob margin (nats)'], '.2f')} "
            f"| {cell(r['reward margin vs SFT'], '.3f')} |"
            for r in pref.rows()
        ],
        "",
    ]
    if pref.unpaired is not None:
        u = pref.unpaired
        lines += [
            f"Held-out unpaired answers ({u.desirable} desirable, {u.undesirable} undesirable): this model's "
            f"reward against the SFT model has the label's sign for {u.label_accuracy:.3f} of them.",
            "",
        ]
    sft = (metrics.sft or {}).get(metrics.main)
    if sft is not None:
        tuned = metrics.value("tuned", metrics.main)
        lines += [
            f"{label(metrics.main)} on the task's test rows: SFT model {sft:.4f}, this model {tuned:.4f}.",
            "",
        ]
    return lines


def publish(merged_dir: str | Path, manifest_path: str | Path, out_dir: str | Path) -> None:
    """The shippable model folder: the merged weights (hard links, no copy), its card and manifest."""
    src, out = Path(merged_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.rglob("*")):
        if f.is_dir() or f.name in ("README.md", "manifest.json") or f.name.startswith("."):
            # README and manifest are written below, never through a link into merged/; hidden
            # files (Snakemake's .snakemake_timestamp) are each folder's own: a shared inode would
            # make touching one mark the other as changed.
            continue
        dst = out / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copy2(f, dst)
    shutil.copyfile(manifest_path, out / "manifest.json")
    (out / "README.md").write_text(model_card(Manifest.read(manifest_path)))
