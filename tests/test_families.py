"""The model matrix: one tiny random-weight model per chat-template family (its architecture from
transformers' config classes, its real chat template and special tokens on the SmolLM2 vocabulary,
tests/fixtures/make_families.py) through every stage, and each family's Ollama TEMPLATE rendered by
Go's own text/template against the Hugging Face template, token for token.

The matrix run writes results/family_matrix.md; README's support table is that file (the test
fails if they differ, printing the table to paste)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Workflow, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kiln import families

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_families import FAMILIES as FIXTURES  # noqa: E402
from make_families import make  # noqa: E402

# the tiny pipeline's model size (2 layers, 64 wide), without its architecture
SMALL = {k: v for k, v in tiny_config()["models"]["tiny"]["architecture"].items() if k != "model_type"}
# fixture -> (architecture, family Kiln must recognise, end of turn, extra architecture keys)
MATRIX = {
    "llama3": ("llama", "llama3", "<|eot_id|>", {}),
    "qwen2": ("qwen2", "chatml", "<|im_end|>", {}),
    "qwen3": ("qwen3", "qwen3", "<|im_end|>", {"head_dim": 16}),
    # query_pre_attn_scalar = head_dim as in Gemma 3's releases (1B-12B): llama.cpp scales queries by
    # 1/sqrt(head_dim) whatever the config says (transformers' default of 256 gave a GGUF whose
    # log-probabilities were 0.18 off, which the export's verification refused); a window of 64 is
    # shorter than the prompts, so sliding-window attention is exercised
    "gemma3": (
        "gemma3_text",
        "gemma",
        "<end_of_turn>",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    ),
    "mistral": ("mistral", "mistral", "</s>", {}),
    "phi3": ("phi3", "phi3", "<|end|>", {}),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "12 apples, 3 pears"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "2024 orders, 7 left"},
    ],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
]


@pytest.fixture(scope="session")
def family_tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: make(name, root) for name in FIXTURES}


def prepared(folder: Path):
    """The tokenizer as Kiln's base-model stage leaves it (end of turn as eos, a pad token)."""
    from kiln.base_model import _fix_tokenizer

    return _fix_tokenizer(AutoTokenizer.from_pretrained(folder), None, None)


@pytest.mark.parametrize("fixture", list(MATRIX))
def test_each_family_is_recognised_and_its_answers_are_labelled_up_to_its_end_of_turn(fixture, family_tokenizers):
    from kiln.tokenize import tokenize_batch

    _, family, eot, _ = MATRIX[fixture]
    tok = prepared(family_tokenizers[fixture])
    assert families.family_of(tok.chat_template).name == family
    assert families.end_of_turn(tok) == eot == tok.eos_token
    assert tok.pad_token is not None and (tok.pad_token != eot or fixture == "phi3")  # phi3 pads with <|endoftext|>
    answer = '{"item": "widget", "qty": 12}'
    messages = [*CONVERSATIONS[1], {"role": "assistant", "content": answer}]
    out = tokenize_batch({"messages": [messages], "kind": ["chat"]}, tok, 512, True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    lead = families.answer_lead(tok)  # Mistral writes a space before the answer: the model writes it too
    assert lead == (" " if fixture == "mistral" else "")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == lead + answer + eot


def test_a_family_kiln_does_not_know_is_named_with_the_setting_to_change(family_tokenizers):
    tok = prepared(family_tokenizers["llama3"])
    tok.chat_template = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
    problem = families.check_export(tok.chat_template, True, ["q8_0"])
    assert "no family Kiln writes an Ollama TEMPLATE for" in problem and "export.ollama: auto" in problem
    assert families.check_export(tok.chat_template, "auto", ["q8_0"]) is None


def test_an_unknown_family_is_refused_when_parsed_or_before_training_never_after(tmp_path, family_tokenizers):
    """A local or random model's template is read when the workflow is parsed; a Hub model's only once
    the base_model rule fetched it, so the train rule checks it before its first step."""
    from kiln.config import ConfigError, validate

    folder = tmp_path / "unknown"
    tok = AutoTokenizer.from_pretrained(family_tokenizers["llama3"])
    tok.chat_template = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
    tok.save_pretrained(folder)
    cfg = tiny_config()
    cfg["models"]["tiny"]["tokenizer_from"] = str(folder)
    cfg["experiments"]["tiny"]["export"] = {"ollama": True}
    with pytest.raises(ConfigError, match=r"experiments\.tiny\.export\.ollama: .*set export\.ollama: auto"):
        validate(cfg)
    cfg = tiny_config()
    cfg["models"]["tiny"]["tokenizer_from"] = str(folder)
    cfg["experiments"]["tiny"]["export"] = {"ollama": "auto"}
    validate(cfg)  # auto (the default): a Modelfile without TEMPLATE, nothing refused
    with pytest.raises(families.FamilyError, match=r"^experiments\.e\.export\.ollama: export\.ollama is true"):
        families.refuse_unknown_export(folder, {"ollama": True, "gguf": ["q8_0"]}, "experiments.e")
    families.refuse_unknown_export(folder, {"ollama": "auto", "gguf": ["q8_0"]}, "experiments.e")
    families.refuse_unknown_export(folder, {"ollama": True, "gguf": []}, "experiments.e")  # no GGUF: no Modelfile
    families.refuse_unknown_export(family_tokenizers["llama3"], {"ollama": True, "gguf": ["q8_0"]}, "e")


def test_a_gemma3_config_llama_cpp_would_not_compute_is_refused_before_training(tmp_path):
    """llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim), not by query_pre_attn_scalar (the
    matrix's first gemma3 fixture, at transformers' default of 256, made a GGUF 0.18 off)."""
    config = AutoConfig.for_model("gemma3_text", **SMALL, head_dim=16).to_dict()
    assert config["query_pre_attn_scalar"] == 256  # transformers' default
    assert "query_pre_attn_scalar is 256" in families.llama_cpp_problem(config)
    assert families.llama_cpp_problem({**config, "query_pre_attn_scalar": 16}) is None
    assert families.llama_cpp_problem(AutoConfig.for_model("llama", **SMALL).to_dict()) is None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(families.FamilyError, match=r"^experiments\.g\.export\.gguf: llama\.cpp scales"):
        families.refuse_unknown_export(tmp_path, {"gguf": ["f16"], "ollama": "auto"}, "experiments.g")
    families.refuse_unknown_export(tmp_path, {"gguf": [], "ollama": "auto"}, "experiments.g")  # export off


def test_a_phi3_folder_with_a_byte_level_vocabulary_is_converted_as_gpt2_from_links(tmp_path, family_tokenizers):
    """llama.cpp's converter takes Phi-3's byte-level BPE vocabulary only under the class name
    GPT2Tokenizer; the merged folder itself is left as it is, the converter reads links to it."""
    merged = tmp_path / "merged"
    AutoTokenizer.from_pretrained(family_tokenizers["phi3"]).save_pretrained(merged)
    settings = json.loads((merged / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "TokenizersBackend"  # as transformers 5 saves the base model's tokenizer
    (merged / "tokenizer_config.json").write_text(json.dumps(settings))
    (merged / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    (merged / "model.safetensors").write_bytes(b"weights")
    source = Path(families.converter_folder(merged, tmp_path / "stage" / "merged"))
    assert source == tmp_path / "stage" / "merged"
    assert json.loads((source / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    assert (source / "model.safetensors").is_symlink() and (source / "tokenizer.json").is_symlink()
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] != "GPT2Tokenizer"
    (merged / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert families.converter_folder(merged, tmp_path / "other") == str(merged)


def test_a_known_split_rule_over_another_vocabulary_gets_the_familys_llama_cpp_name(family_tokenizers):
    """The converter names a pre-tokenizer by the hash of one probe's ids, so Qwen 2's rule over
    another vocabulary is 'not recognized'; kiln/gguf_convert.py names it by the rule itself
    (normalizer and pre-tokenizer equal to those transformers' Qwen2Tokenizer builds)."""
    from conftest import TOKENIZER

    from kiln.gguf_convert import same_as_family  # the file the export environment's Python runs

    assert type(AutoTokenizer.from_pretrained(family_tokenizers["qwen2"])).__name__ == "Qwen2Tokenizer"
    assert same_as_family(AutoTokenizer.from_pretrained(family_tokenizers["qwen2"])) == "qwen2"
    assert same_as_family(AutoTokenizer.from_pretrained(TOKENIZER)) is None  # SmolLM2's own rule: not Qwen's


GO = shutil.which("go")


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory) -> Path:
    if GO is None:
        pytest.skip("Go is not installed (make system-deps installs Debian's golang-go)")
    out = tmp_path_factory.mktemp("go") / "gotemplate"
    env = {
        "PATH": "/usr/bin:/bin:" + str(Path(GO).parent),
        "GOCACHE": str(out.parent / "cache"),
        "HOME": str(out.parent),
    }
    subprocess.run([GO, "build", "-o", str(out), "main.go"], cwd=REPO / "tests" / "gotemplate", check=True, env=env)
    return out


def go_render(renderer: Path, template: str, messages: list[dict]) -> str:
    proc = subprocess.run(
        [str(renderer)], input=json.dumps({"template": template, "messages": messages}), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fixture", list(MATRIX))
def test_the_ollama_template_renders_in_go_as_the_hugging_face_template_does(fixture, family_tokenizers, go_renderer):
    tok = prepared(family_tokenizers[fixture])
    template = families.ollama_template(tok)
    for messages in CONVERSATIONS:
        hf = families.without_bos(tok, families.generation_prompt(tok, messages))
        go = go_render(go_renderer, template, messages)
        assert tok(go, add_special_tokens=False)["input_ids"] == tok(hf, add_special_tokens=False)["input_ids"], (
            f"{fixture}: Go renders {go!r}, Hugging Face {hf!r}"
        )


def test_the_default_models_chatml_template_renders_in_go_as_it_does_in_hugging_face(go_renderer):
    from conftest import TOKENIZER

    tok = prepared(TOKENIZER)
    for messages in CONVERSATIONS:
        hf = families.without_bos(tok, families.generation_prompt(tok, messages))
        assert go_render(go_renderer, families.ollama_template(tok), messages) == hf


# ---- the matrix run ------------------------------------------------------------------------------
def local_llama3(folder: Path, tokenizer: Path) -> Path:
    """A Llama-3-style model saved as a user's local folder (kind: local)."""
    import torch

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), **SMALL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def matrix_config(tokenizers: dict[str, Path], llama_folder: Path) -> dict:
    config = tiny_config(rows=40, max_steps=2)
    base_exp = config["experiments"].pop("tiny")
    config["models"] = {}
    for fixture, (arch, *_rest, extra) in MATRIX.items():
        if fixture == "llama3":
            config["models"][fixture] = {"kind": "local", "path": str(llama_folder)}
        else:
            architecture = {"model_type": arch, **SMALL, **extra}
            config["models"][fixture] = {
                "kind": "random",
                "tokenizer_from": str(tokenizers[fixture]),
                "seed": 0,
                "architecture": architecture,
            }
        config["experiments"][fixture] = {
            **base_exp,
            "model": fixture,
            "export": {"gguf": ["f16"], "verify_prompts": 4},
        }
    return config


STAGES = ("base_model", "tokenize", "train", "merge", "evaluate", "export_gguf", "ollama_modelfile")


def stage_done(wf: Workflow, fixture: str) -> dict[str, bool]:
    p = wf.path
    tok_json = list(Path(p("data/orders/tokenized")).glob(f"{fixture}-*.json"))  # {model}-{settings}.json
    done = {
        "base_model": Path(p(f"base/{fixture}/identity.json")).exists(),
        "train": Path(p(f"{fixture}/adapter/adapter_config.json")).exists(),
        "merge": Path(p(f"{fixture}/merged/config.json")).exists(),
        "evaluate": Path(p(f"{fixture}/metrics.json")).exists(),
        "export_gguf": Path(p(f"{fixture}/gguf/verify-f16.json")).exists(),
        "ollama_modelfile": Path(p(f"{fixture}/gguf/Modelfile")).exists(),
    }
    done["tokenize"] = bool(tok_json)
    return done


def support_table(rows: list[tuple]) -> str:
    head = "| family (fixture) | architecture | chat template | " + " | ".join(STAGES) + " | served | notes |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    for fixture, arch, family, stages, served, note in rows:
        marks = " | ".join("yes" if stages[s] else "no" for s in STAGES)
        lines.append(f"| {fixture} | {arch} | {family} | {marks} | {'yes' if served else 'no'} | {note} |")
    return "\n".join(lines) + "\n"


UNKNOWN = "other"  # a chat template of no known family (export.ollama at its default, auto)
UNKNOWN_TEMPLATE = (
    "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def unknown_family_model(folder: Path) -> dict:
    from conftest import TOKENIZER

    shutil.copytree(TOKENIZER, folder)
    (folder / "chat_template.jinja").write_text(UNKNOWN_TEMPLATE)
    return {
        "kind": "random",
        "tokenizer_from": str(folder),
        "seed": 0,
        "architecture": {"model_type": "llama", **SMALL},
    }


def served_json(wf: Workflow, fixture: str) -> bool:
    """One request to `kiln serve` with response_format: the answer is a JSON object."""
    from test_export import free_port, served_answers, start_server

    from kiln.answers import answer_json_schema
    from kiln.synthetic import ANSWER_SCHEMA

    schema = answer_json_schema(ANSWER_SCHEMA)
    for prop in schema["properties"].values():
        if prop == {"type": "string"}:
            prop["maxLength"] = 8
    port = free_port()
    server = start_server(wf.workdir / "results", fixture, port)
    try:
        answer = served_answers(f"http://127.0.0.1:{port}", [CONVERSATIONS[1]], schema, 400)[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return isinstance(json.loads(answer), dict)


def check_family_outputs(wf: Workflow, fixture: str, arch: str, eot: str) -> None:
    """Generation stops at the family's end of turn (generation_config and the GGUF's eos), the GGUF
    is verified, the Modelfile has the family's TEMPLATE and stop token, LoRA found its targets."""
    merged = wf.path(f"{fixture}/merged")
    tok = AutoTokenizer.from_pretrained(merged)
    eot_id = tok.convert_tokens_to_ids(eot)
    generation = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert eot_id in ([generation] if isinstance(generation, int) else generation)
    report = json.loads(wf.path(f"{fixture}/gguf/verify-f16.json").read_text())
    assert report["ok"] and report["metadata"]["eos_token_id"] == eot_id, report["problems"]
    modelfile = wf.path(f"{fixture}/gguf/Modelfile").read_text()
    assert f'TEMPLATE """{families.ollama_template(tok)}"""' in modelfile
    assert f'PARAMETER stop "{eot}"' in modelfile
    # the merged model answers like the adapter on its base (the merge rule's logit check)
    from kiln.merge import MAX_MERGE_ERROR_RATIO

    merge = json.loads(wf.path(f"{fixture}/merge_report.json").read_text())
    assert merge["merge_error_ratio"] <= MAX_MERGE_ERROR_RATIO, merge
    targets = json.loads(wf.path(f"{fixture}/adapter/adapter_config.json").read_text())["target_modules"]
    if arch == "phi3":  # fused projections: LoRA on qkv_proj and gate_up_proj
        assert {"qkv_proj", "gate_up_proj"} <= {t.rsplit(".", 1)[-1] for t in targets}, targets


def refusal_note(wf: Workflow, fixture: str, arch: str) -> str:
    log = wf.path(f"logs/base_model/{fixture}.log")
    match = re.search(r"transformers reloads this model's tokenizer as (\w+)", log.read_text() if log.exists() else "")
    if not match:
        return ""
    return (
        f"refused before training: transformers loads any {arch} folder's tokenizer as {match.group(1)}, "
        f"which splits this fixture's SmolLM2 vocabulary differently (released {arch} models ship that class)"
    )


@pytest.mark.slow
def test_every_family_runs_every_stage_and_readmes_table_is_this_run(tmp_path, family_tokenizers):
    llama = local_llama3(tmp_path / "my-llama3", family_tokenizers["llama3"])
    config = matrix_config(family_tokenizers, llama)
    config["models"][UNKNOWN] = unknown_family_model(tmp_path / "unknown-template")
    config["experiments"][UNKNOWN] = {**config["experiments"]["llama3"], "model": UNKNOWN}
    wf = Workflow(tmp_path / "run", config)
    # One `snakemake --cores 1` for the whole matrix (the data stages shared); --keep-going so one
    # family's failure does not hide the others in the table.
    proc = subprocess.run([*wf.command(cores=1), "--keep-going"], capture_output=True, text=True, cwd=wf.workdir)
    rows = []
    for fixture, (arch, family, eot, _) in MATRIX.items():
        stages = stage_done(wf, fixture)
        note, served = "", False
        if all(stages.values()):
            check_family_outputs(wf, fixture, arch, eot)
            served = served_json(wf, fixture)
        else:
            note = refusal_note(wf, fixture, arch)
        rows.append((fixture, arch, family, stages, served, note))
    # a template of no known family: every stage, the GGUF verified, a Modelfile without TEMPLATE, and
    # the note on the console and the model card
    stages = stage_done(wf, UNKNOWN)
    if all(stages.values()):
        assert json.loads(wf.path(f"{UNKNOWN}/gguf/verify-f16.json").read_text())["ok"]
        assert wf.path(f"{UNKNOWN}/gguf/Modelfile").read_text().startswith("# Kiln: no TEMPLATE")
        assert f"Kiln: NOTE {UNKNOWN}: the Ollama Modelfile has no TEMPLATE" in proc.stderr  # the run summary
        assert "Note: the Ollama Modelfile has no TEMPLATE" in wf.path(f"{UNKNOWN}/model/README.md").read_text()
    note = "no family known: the Modelfile has no TEMPLATE (export.ollama: auto)"
    rows.append((UNKNOWN, "llama", "unknown", stages, all(stages.values()) and served_json(wf, UNKNOWN), note))
    table = support_table(rows)
    (wf.workdir / "results" / "family_matrix.md").write_text(table)
    failed = [r[0] for r in rows if not (all(r[3].values()) and r[4]) and (not r[5] or r[0] == UNKNOWN)]
    assert not failed, f"families failing without a named refusal: {failed}\n{proc.stderr[-6000:]}"
    assert [r[0] for r in rows if r[5] and r[0] != UNKNOWN] == [], table  # no family refused
    assert proc.returncode == 0, proc.stderr[-6000:]
    readme = (REPO / "README.md").read_text()
    assert table in readme, f"README's support table is not this run's; paste:\n{table}"
