"""Chat-template families: what depends on the model family, in one room.

A family is recognised from the model's own chat template (not its name or architecture: a Llama
architecture can carry ChatML, as SmolLM2 does). What depends on it:
- the end-of-turn token: the token the template writes after an assistant answer, which the answer
  mask labels (so the model learns to stop) and which generation stops at. It is read from the
  template itself (``end_of_turn``: render a conversation and look at what follows the answer), and
  the family table only cross-checks it; Llama 3's ``<|eot_id|>`` and Gemma's ``<end_of_turn>`` are
  not their tokenizers' ``eos_token``, the classic never-stops fine-tune;
- chat-template variables for generation prompts (Qwen 3: ``enable_thinking=False``, so a prompt ends
  with the empty think block every training row's answer follows);
- the Ollama Modelfile's TEMPLATE (Go text/template) and stop tokens. Written here, not taken from
  Ollama's library or Unsloth's ``ollama_template_mappers``: those render what the released models
  were served with (no date preamble for Llama 3.1, no space before a Mistral answer, no default
  Qwen system prompt), and a fine-tune must be served exactly what it was trained on. Each TEMPLATE
  here is checked by rendering it with Go's own text/template against the Hugging Face template,
  token for token (tests/test_families.py, tests/gotemplate/);
- the pad token where the family has none (Llama 3, Mistral): a reserved token of the family when the
  vocabulary has it, else the tokenizer's unk, else eos (labels come from the answer mask, never from
  the pad id, so a pad equal to eos cannot hide the end of an answer).

A template none of the families matches is not an error by itself (answer masking and the end of
turn are read from the template); what needs the family (the Modelfile's TEMPLATE) is checked
before training: ``check_export`` names the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SENTINEL_USER = "kiln-probe-question"
SENTINEL_ANSWER = "kiln-probe-answer"
SENTINEL_SYSTEM = "kiln-probe-system"


class FamilyError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    markers: tuple[str, ...]  # every one appears in the family's chat template
    end_of_turn: str
    stop: tuple[str, ...]  # Ollama's stop parameters
    system_role: bool  # False: the template folds the system text into a user turn
    example: str  # a Hub model of the family (config comments, README)
    prompt_kwargs: dict = field(default_factory=dict)
    pad_candidates: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family(
        "qwen3",
        ("<|im_start|>", "<think>"),
        "<|im_end|>",
        ("<|im_end|>", "<|im_start|>"),
        True,
        "Qwen/Qwen3-0.6B",
        {"enable_thinking": False},
    ),
    Family(
        "chatml", ("<|im_start|>",), "<|im_end|>", ("<|im_end|>", "<|im_start|>"), True, "Qwen/Qwen2.5-0.5B-Instruct"
    ),
    Family(
        "llama3",
        ("<|start_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        ("<|eot_id|>", "<|start_header_id|>", "<|eom_id|>"),
        True,
        "meta-llama/Llama-3.2-1B-Instruct",
        pad_candidates=("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"),
    ),
    Family(
        "gemma",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
        ("<end_of_turn>",),
        False,
        "google/gemma-3-1b-it",
    ),
    Family(
        "mistral",
        ("[INST]", "[/INST]"),
        "</s>",
        ("</s>", "[INST]"),
        False,
        "mistralai/Mistral-7B-Instruct-v0.3",
        pad_candidates=("<unk>",),
    ),
    Family(
        "phi3",
        ("<|assistant|>", "<|end|>"),
        "<|end|>",
        ("<|end|>", "<|user|>"),
        True,
        "microsoft/Phi-3.5-mini-instruct",
    ),
)
KNOWN = ", ".join(f.name for f in FAMILIES)


def family_of(chat_template: str | None) -> Family | None:
    """The family whose markers all appear in the template (the first such in FAMILIES)."""
    if not chat_template:
        return None
    return next((f for f in FAMILIES if all(m in chat_template for m in f.markers)), None)


def _render(tok, messages: list[dict], generation: bool, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)


def prompt_kwargs(tok) -> dict:
    """Chat-template variables for a generation prompt of this tokenizer's family."""
    fam = family_of(tok.chat_template)
    return dict(fam.prompt_kwargs) if fam else {}


def generation_prompt(tok, messages: list[dict]) -> str:
    """The text a model is asked to continue: the conversation and the assistant's opening, as the
    family's training rows put it before every answer."""
    return _render(tok, messages, True, **prompt_kwargs(tok))


def end_of_turn(tok) -> str | None:
    """The special token the chat template writes right after an assistant answer, read from the
    template itself (None: the answer is followed by no special token)."""
    text = _render(
        tok, [{"role": "user", "content": SENTINEL_USER}, {"role": "assistant", "content": SENTINEL_ANSWER}], False
    )
    after = text[text.rfind(SENTINEL_ANSWER) + len(SENTINEL_ANSWER) :] if SENTINEL_ANSWER in text else ""
    specials = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    return next((s for s in specials if after.startswith(s)), None)


def answer_lead(tok) -> str:
    """Text the template writes between the generation prompt and the answer (Mistral: a space),
    which the model must write itself: labelled with the answer. Empty for most families."""
    user = [{"role": "user", "content": SENTINEL_USER}]
    prompt = generation_prompt(tok, user)
    full = _render(tok, [*user, {"role": "assistant", "content": SENTINEL_ANSWER}], False)
    if not full.startswith(prompt) or SENTINEL_ANSWER not in full[len(prompt) :]:
        return ""
    return full[len(prompt) : full.index(SENTINEL_ANSWER, len(prompt))]


def pad_token(tok, eot: str | None) -> str | None:
    """A pad token for a tokenizer that has none (or one equal to the end of turn)."""
    fam = family_of(tok.chat_template)
    vocab = tok.get_vocab()
    for candidate in (*(fam.pad_candidates if fam else ()), tok.unk_token):
        if candidate and candidate in vocab and candidate != eot:
            return candidate
    return tok.pad_token if tok.pad_token not in (None, eot) else (tok.eos_token if tok.eos_token != eot else eot)


# ---- Ollama ------------------------------------------------------------------------------------
def _between(text: str, start: str, end: str) -> str:
    a = text.index(start) + len(start)
    return text[a : text.index(end, a)]


def without_bos(tok, text: str) -> str:
    """The text less a leading BOS the template writes itself (``{{ bos_token }}``): llama.cpp and
    Ollama add BOS from the GGUF's own setting, so a TEMPLATE leaves it out."""
    bos = tok.bos_token
    if bos and "bos_token" in (tok.chat_template or "") and text.startswith(bos):
        return text[len(bos) :]
    return text


def ollama_template(tok) -> str:
    """The chat template in Ollama's Go-template syntax for the tokenizer's family. Ollama passes
    `.Messages` (system messages included) and `.System` (their text joined); BOS is llama.cpp's to
    add (the GGUF's add_bos), so a template's leading bos_token is not written here."""
    fam = family_of(tok.chat_template)
    if fam is None:
        raise FamilyError(unknown_message(tok.chat_template))
    plain = _render(tok, [{"role": "user", "content": SENTINEL_USER}], True, **fam.prompt_kwargs)
    plain = without_bos(tok, plain)
    opening = plain[plain.index(SENTINEL_USER) + len(SENTINEL_USER) :]  # end of user turn + assistant opening
    if fam.name in ("chatml", "qwen3"):
        default = plain[: plain.index("<|im_start|>user")]  # Qwen 2.5's default system block, or nothing
        gen = opening.removeprefix("<|im_end|>\n")
        return (
            (f"{{{{- if not .System }}}}{default}{{{{ end }}}}" if default else "")
            + "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            + gen
        )
    if fam.name == "llama3":
        head = "<|start_header_id|>system<|end_header_id|>\n\n"
        preamble = _between(plain, head, "<|eot_id|>") if plain.startswith(head) else None
        system = (
            f"{head}{preamble}{{{{ .System }}}}<|eot_id|>"
            if preamble is not None
            else f"{{{{ if .System }}}}{head}{{{{ .System }}}}<|eot_id|>{{{{ end }}}}"
        )
        return (
            system
            + '{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
            + "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    if fam.name == "gemma":
        return (
            '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}<start_of_turn>user\n'
            "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }}<end_of_turn>\n"
            '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
            "{{ end }}{{ end }}<start_of_turn>model\n"
        )
    if fam.name == "mistral":
        return (
            '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}[INST] '
            "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
            '{{ $m.Content }}[/INST]{{ else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{ end }}{{ end }}'
        )
    # phi3
    return (
        '{{- range .Messages }}{{ if or (ne .Role "system") .Content }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n'
        "{{ end }}{{ end }}<|assistant|>\n"
    )


def ollama_stop(tok) -> list[str]:
    fam = family_of(tok.chat_template)
    eot = end_of_turn(tok) or tok.eos_token
    return list(dict.fromkeys([eot, *(fam.stop if fam else ())]))


def unknown_message(chat_template: str | None) -> str:
    head = (chat_template or "(none)").strip().splitlines()[0][:80]
    return (
        f"the chat template is of no family Kiln writes an Ollama TEMPLATE for (known: {KNOWN}; the template "
        f"begins {head!r}): set export.ollama: auto (a Modelfile without TEMPLATE) or false (none)"
    )


def saved_chat_template(folder) -> str | None:
    """A saved tokenizer folder's chat template (chat_template.jinja, else tokenizer_config.json's)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def check_export(chat_template: str | None, ollama_setting, gguf_types: list) -> str | None:
    """The one-line problem, before training, of an export that would fail after it: None if fine."""
    if ollama_setting is True and gguf_types and family_of(chat_template) is None:
        return "export.ollama is true, but " + unknown_message(chat_template)
    return None


def llama_cpp_problem(model_config: dict) -> str | None:
    """What llama.cpp computes differently from transformers for this model config, so that its GGUF
    would fail the export's next-token check: None if nothing known. llama.cpp scales Gemma 3's
    queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B) and reads no
    ``query_pre_attn_scalar``; every released Gemma 3 has them equal, a custom config may not."""
    if model_config.get("model_type") not in ("gemma3", "gemma3_text"):
        return None
    text = model_config.get("text_config") or model_config
    per_head = text["hidden_size"] // text["num_attention_heads"]
    head_dim = text.get("head_dim") or per_head
    scalar = text.get("query_pre_attn_scalar")
    if scalar is None or scalar in (head_dim, per_head):
        return None
    return (
        f"llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim = {head_dim}), but this model's "
        f"query_pre_attn_scalar is {scalar}: its GGUF would not compute this model (set "
        "query_pre_attn_scalar to head_dim, or export.gguf: [])"
    )


def refuse_unknown_export(base_dir, export: dict, where: str) -> None:
    """At the start of training, for what could not be read when the workflow was parsed (a Hub or
    GGUF-package model is fetched by the base_model rule): the export's problem as one line
    (FamilyError), before any step is spent. ``export`` is the experiment's config entry."""
    import json
    from pathlib import Path

    gguf = export.get("gguf", ["q8_0"])
    problem = check_export(saved_chat_template(base_dir), export.get("ollama", "auto"), gguf)
    if problem:
        raise FamilyError(f"{where}.export.ollama: {problem}")
    config = Path(base_dir, "config.json")
    problem = gguf and config.is_file() and llama_cpp_problem(json.loads(config.read_text()))
    if problem:
        raise FamilyError(f"{where}.export.gguf: {problem}")


def converter_folder(merged_dir, staging) -> str:
    """The folder llama.cpp's converter reads for this merged model: ``merged_dir`` itself, except
    where the converter decides the vocabulary by a class name transformers no longer saves. Its
    Phi-3 path takes a byte-level BPE vocabulary only from a folder whose tokenizer_config.json says
    ``GPT2Tokenizer`` (as Phi-4's does), else it wants SentencePiece's tokenizer.model; transformers
    5 saves such a tokenizer as ``TokenizersBackend``. Then ``staging`` (a new folder) gets links to
    every file and a tokenizer_config.json naming GPT2Tokenizer; the weights are not copied."""
    import json
    from pathlib import Path

    merged = Path(merged_dir)
    config = json.loads((merged / "config.json").read_text())
    tok_file, tok_config = merged / "tokenizer.json", merged / "tokenizer_config.json"
    if "Phi3ForCausalLM" not in config.get("architectures", []) or (merged / "tokenizer.model").exists():
        return str(merged)
    if not (tok_file.is_file() and tok_config.is_file()):
        return str(merged)
    spec = json.loads(tok_file.read_text())
    byte_level = spec.get("model", {}).get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    settings = json.loads(tok_config.read_text())
    if not byte_level or settings.get("tokenizer_class") == "GPT2Tokenizer":
        return str(merged)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for item in merged.iterdir():
        if item.name != "tokenizer_config.json":
            (staging / item.name).symlink_to(item.resolve())
    settings["tokenizer_class"] = "GPT2Tokenizer"
    (staging / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return str(staging)
