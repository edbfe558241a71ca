"""The `kiln` command: `kiln trace ID`, `kiln repro EXP` (audit a finished run), `kiln url-hash URL`.

Installed as a console script (pyproject.toml [project.scripts]); `python -m kiln` is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

TRACE_HELP = """Trace one dataset row back to its raw record: kiln trace ID [--dataset D] [--json].

ID is a row's ``kiln_id`` (or a unique prefix of one), as found in any Kiln output: the dataset,
the rejected shards, samples.jsonl. Prints every raw occurrence of that content (source, file,
row, original text), what cleaning changed or why it rejected the row, and the split it is in."""

REPRO_HELP = """Reproducibility check: kiln repro EXPERIMENT [--workdir DIR] [--data-only].

Rebuilds the experiment from its manifest (results/EXPERIMENT/manifest.json) in an empty folder:
the data stages must give the manifest's split fingerprints exactly and the base model its weight
hashes; then it retrains on this machine with the same seed and compares the test metrics within
the tolerances printed. Exit status 0 when everything reproduced, 1 when something did not."""


def trace_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="kiln trace", description=TRACE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("id", help="kiln_id of the row, or a unique prefix of one")
    ap.add_argument("--dataset", help="dataset name (default: the only one, or the first, in the config)")
    ap.add_argument("--results", help="results folder (default: `results` of the config)")
    ap.add_argument("--config", default="config/config.yaml", help="the Kiln config the workflow ran with")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    import yaml

    from kiln.lineage import TraceError, format_trace, trace

    cfg = {}
    try:
        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError:
        if not (args.dataset and args.results):
            print(f"kiln trace: cannot read {args.config}; pass --dataset and --results", file=sys.stderr)
            return 2
    dataset = args.dataset or next(iter(cfg.get("datasets") or {}), None)
    results = args.results or cfg.get("results", "results")
    try:
        result = trace(results, dataset, args.id)
    except TraceError as exc:
        print(f"kiln trace: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_trace(result))
    return 0


def repro_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="kiln repro", description=REPRO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("experiment")
    ap.add_argument("--results", default="results", help="where the original run's outputs are")
    ap.add_argument("--manifest", help="manifest to check against (default: RESULTS/EXPERIMENT/manifest.json)")
    ap.add_argument("--workdir", help="empty folder to rebuild in (default: a new temporary folder)")
    ap.add_argument("--data-only", action="store_true", help="check data and base model only, no retraining")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary rebuild folder when every check passes")
    args = ap.parse_args(argv)
    from kiln.layout import Layout
    from kiln.repro import format_report, reproduce

    manifest = args.manifest or Layout(args.results).manifest(args.experiment)
    if not os.path.exists(manifest):
        print(f"kiln repro: {manifest} does not exist: build the experiment first", file=sys.stderr)
        return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"kiln-repro-{args.experiment}-")
    try:
        result = reproduce(manifest, workdir, train=not args.data_only, cores=args.cores)
    except ValueError as exc:  # refused (the manifest's config would be code) or a non-empty workdir
        print(f"kiln {exc}" if str(exc).startswith("repro:") else f"kiln repro: {exc}", file=sys.stderr)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return 2
    # A rebuild is a whole run (about a GB for SmolLM2): a temporary one goes once every check
    # passed; a failed one stays for inspection, and the report says where.
    if not args.workdir and result.ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        result = dataclasses.replace(result, workdir_removed=True)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_report(result))
    return 0 if result.ok else 1


def url_hash_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="kiln url-hash", description="Download URLs with the url source's limits; print each sha256 to pin."
    )
    ap.add_argument("urls", nargs="+")
    ap.add_argument("--max-bytes", type=int, default=None, help="size limit (default: the url source's)")
    ap.add_argument("--deadline-s", type=float, default=None, help="whole-download limit (default: the source's)")
    args = ap.parse_args(argv)
    from pathlib import Path

    from kiln.sources import DEADLINE_S, MAX_BYTES, CollectError, download

    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for url in args.urls:
            try:
                rec = download(
                    url, Path(tmp) / "x", None, 60, args.max_bytes or MAX_BYTES, args.deadline_s or DEADLINE_S
                )
            except CollectError as exc:
                print(f"kiln url-hash: {exc}", file=sys.stderr)
                status = 1
                continue
            moved = f"  (redirected to {rec['final_url']})" if rec["redirected"] else ""
            print(f"{rec['sha256']}  {url}  {rec['bytes']} bytes{moved}")
    return status


def serve_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="kiln serve",
        description="An OpenAI-compatible server (llama.cpp's) on an exported GGUF: /v1/chat/completions, "
        "/v1/completions, /v1/models, with response_format json_schema for schema-bound answers.",
    )
    ap.add_argument("experiment", nargs="?", default="default")
    ap.add_argument("--results", default="results")
    ap.add_argument("--gguf", help="the GGUF file (default: RESULTS/EXPERIMENT/gguf/model-q8_0.gguf, or the only one)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--ctx", type=int, default=4096, help="context length of each request")
    ap.add_argument("--slots", type=int, default=2, help="requests decoded in parallel")
    args = ap.parse_args(argv)
    import glob
    import time

    from kiln.layout import Layout

    path, tree = args.gguf, Layout(args.results)
    if path is None:
        found = sorted(glob.glob(tree.gguf(args.experiment, "*")))
        q8 = [p for p in found if p == tree.gguf(args.experiment, "q8_0")]
        path = (q8 or found or [None])[0]
    if not path or not os.path.exists(path):
        print(
            f"kiln serve: no GGUF for '{args.experiment}' under {args.results}: build it first "
            f"(snakemake --cores 1 {tree.gguf(args.experiment, 'q8_0')}) or pass --gguf",
            file=sys.stderr,
        )
        return 2
    from kiln.llamacpp import LlamaCpp

    server = LlamaCpp(path, n_ctx=args.ctx, host=args.host, port=args.port, slots=args.slots)
    print(f"kiln serve: {path} at {server.url}/v1 (OpenAI-compatible); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
    return 0


COMMANDS = {"trace": trace_main, "repro": repro_main, "url-hash": url_hash_main, "serve": serve_main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: kiln {trace,repro,url-hash,serve} ...\n  kiln trace ID      where a dataset row came from\n"
            "  kiln repro EXP     rebuild an experiment from its manifest and compare\n"
            "  kiln serve [EXP]   an OpenAI-compatible server on the experiment's GGUF\n"
            "  kiln url-hash URL  the sha256 to pin a url source with",
            file=sys.stderr,
        )
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except BrokenPipeError:  # `kiln trace ID --json | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
