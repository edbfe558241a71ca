"""The exported GGUF against the merged model it came from: speed, and schema-bound serving.

    python benchmarks/gguf_export.py --run RUN_DIR --experiment default --out benchmarks/results/gguf_export.json

RUN_DIR holds ``results/`` of a finished run (its ``gguf/model-q8_0.gguf``, ``merged/``, dataset).
In one call, on the same test prompts (the evaluation's, chat-templated):
- speed: llama.cpp (xllamacpp) greedy generation of the q8_0 file, one request at a time and with
  parallel slots (requests sent at once), against transformers' batched greedy generation of the
  merged model (Kiln's evaluation code) at batch sizes 8 to 64; each side at its best, plus
  transformers at Kiln's default batch (32), labelled. Tokens/s counts generated tokens.
- schema-bound decoding: the test prompts through the OpenAI-compatible endpoint with and without
  ``response_format`` (a JSON Schema from the dataset's answer schema): the share of answers that
  parse and validate, and exact match, for both.
- the f16 export's log-probability agreement beside q8_0's (the tolerances in kiln.export).
Run it alone (two cores): the timings are the record.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from data_stages import machine  # noqa: E402


def hf_speed(merged: str, prompts: list[str], max_new: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.passes import generate

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    generate(model, tok, prompts[:batch], batch, 4)  # warm-up
    t0 = time.perf_counter()
    outs = generate(model, tok, prompts, batch, max_new)
    seconds = time.perf_counter() - t0
    tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) + 1 for o in outs)  # + end of turn
    return {"batch": batch, "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def cpp_speed(gguf: str, prompts: list[str], max_new: int, slots: int) -> dict:
    from kiln.llamacpp import LlamaCpp

    with LlamaCpp(gguf, n_ctx=1024, slots=slots) as server:
        server.complete(prompts[0], n_predict=4)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(slots) as pool:
            outs = list(pool.map(lambda p: server.complete(p, n_predict=max_new), prompts))
        seconds = time.perf_counter() - t0
    tokens = sum(o["timings"]["predicted_n"] for o in outs)
    return {"slots": slots, "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def schema_bound(gguf: str, conversations: list[list[dict]], refs: list[str], schema: dict) -> dict:
    import jsonschema

    from kiln.llamacpp import LlamaCpp
    from kiln.metrics import _json_object

    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    out = {}
    with LlamaCpp(gguf, n_ctx=1024) as server:
        for name, fmt in (("unconstrained", None), ("schema_bound", schema)):
            answers = []
            for messages in conversations:
                body = {"messages": messages, "temperature": 0, "max_tokens": 128}
                if fmt:
                    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": fmt}}
                answers.append(server.post("/v1/chat/completions", body)["choices"][0]["message"]["content"])
            parsed = [_json_object(a) for a in answers]
            out[name] = {
                "valid": sum(p is not None and validator.is_valid(p) for p in parsed) / len(answers),
                "exact_match": sum(p is not None and p == _json_object(r) for p, r in zip(parsed, refs)) / len(answers),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--experiment", default="default")
    ap.add_argument("--out", default="benchmarks/results/gguf_export.json")
    args = ap.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from kiln.answers import answer_json_schema
    from kiln.export import export_gguf
    from kiln.prompts import prompts_and_references
    from kiln.spec import EvaluateSettings, ExportSettings

    results = Path(args.run) / "results"
    exp_dir = results / args.experiment
    manifest = json.loads((exp_dir / "manifest.json").read_text())
    exp = manifest["config"]["experiment"]
    merged, gguf = str(exp_dir / "merged"), str(exp_dir / "gguf" / "model-q8_0.gguf")
    dataset = results / "data" / exp["dataset"] / "dataset"
    test = datasets.load_from_disk(str(dataset))["test"]
    tok = AutoTokenizer.from_pretrained(merged)
    prompts, refs, rows = prompts_and_references(test, tok, exp["evaluate"]["max_samples"])
    max_new = exp["evaluate"]["max_new_tokens"]
    record: dict = {"experiment": args.experiment, "prompts": len(prompts), "max_new_tokens": max_new}

    hf = [hf_speed(merged, prompts, max_new, b) for b in (8, 16, 32, 64)]
    cpp = [cpp_speed(gguf, prompts, max_new, s) for s in (1, 2, 4)]
    best_hf, best_cpp = max(hf, key=lambda r: r["tokens_per_s"]), max(cpp, key=lambda r: r["tokens_per_s"])
    default_hf = next(r for r in hf if r["batch"] == exp["evaluate"]["batch_size"])
    record["speed"] = {
        "transformers_batched_float32": hf,
        "llama_cpp_q8_0": cpp,
        "best_transformers": best_hf,
        "best_llama_cpp": best_cpp,
        "ratio_best_llama_cpp_over_best_transformers": round(best_cpp["tokens_per_s"] / best_hf["tokens_per_s"], 2),
        "ratio_over_transformers_at_kiln_batch": round(best_cpp["tokens_per_s"] / default_hf["tokens_per_s"], 2),
    }
    schema = answer_json_schema(manifest["config"]["dataset"]["clean"]["answer_schema"])
    record["serving"] = schema_bound(gguf, [r["messages"][:-1] for r in rows], refs, schema)
    with tempfile.TemporaryDirectory(dir=results) as tmp:  # the f16 export's agreement, for the tolerances
        f16 = Path(tmp) / "model-f16.gguf"
        rep = export_gguf(
            merged,
            str(dataset),
            str(f16),
            str(f16) + ".json",
            "f16",
            ExportSettings.from_dict(exp["export"]),
            EvaluateSettings.from_dict(exp["evaluate"]),
        )
        record["logprobs"] = {
            "f16": rep["logprobs"],
            "q8_0": json.loads((exp_dir / "gguf" / "verify-q8_0.json").read_text())["logprobs"],
        }
    record |= {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
