"""Which merged model to publish: each merge policy and saved dtype, scored like the published one.

    python benchmarks/merge_policy.py --run RUN_DIR --experiment default \\
        --out benchmarks/results/merge_policy.json

RUN_DIR is a folder where the pipeline ran (it holds ``results/``). The experiment's adapter is
merged onto the original 16-bit weights and onto the NF4-rounded weights it was trained against,
each saved in float32 and in bfloat16, with Kiln's own merge (``kiln.merge.merge_adapter``: the
logit check included); each merged folder is then scored by Kiln's evaluation on the same test rows
as the run's ``adapter_4bit`` (the function training produced). The gap to it, the generations that
differ from it and the size on disk are what the merge default (``merge.onto``, ``merge.dtype``) is
chosen by. Run it alone (two cores): the times are part of the record.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from data_stages import machine  # noqa: E402

POLICIES = [("original", "float32"), ("original", "bfloat16"), ("dequantized", "float32"), ("dequantized", "bfloat16")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="folder holding results/ of a finished run")
    ap.add_argument("--experiment", default="default")
    ap.add_argument("--out", default="benchmarks/results/merge_policy.json")
    args = ap.parse_args()

    from kiln.evaluate import EvaluationInputs, evaluate
    from kiln.merge import merge_adapter
    from kiln.spec import EvaluateSettings, MergeSettings

    results = Path(args.run) / "results"
    exp_dir = results / args.experiment
    manifest = json.loads((exp_dir / "manifest.json").read_text())
    exp_cfg = manifest["config"]["experiment"]
    dataset = results / "data" / exp_cfg["dataset"] / "dataset"
    # the run's one tokenization (a folder, with its settings in a .json beside it)
    (tokenized,) = [p for p in (results / "data" / exp_cfg["dataset"] / "tokenized").iterdir() if p.is_dir()]
    run_metrics = json.loads((exp_dir / "metrics.json").read_text())
    main = run_metrics["main_metric"]
    adapter_samples = [json.loads(ln)["adapter_4bit"] for ln in (exp_dir / "samples.jsonl").read_text().splitlines()]
    rows = []
    with tempfile.TemporaryDirectory(dir=results) as tmp:
        for onto, dtype in POLICIES:
            out = Path(tmp) / f"{onto}-{dtype}"
            t0 = time.perf_counter()
            report = merge_adapter(
                str(exp_dir / "adapter"), str(out), str(out) + ".report.json", str(dataset), MergeSettings(onto, dtype)
            )
            merge_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            inputs = EvaluationInputs(
                str(dataset),
                str(tokenized),
                str(results / "base" / exp_cfg["model"]),
                str(out),
                str(exp_dir / "adapter"),
            )
            metrics = evaluate(
                inputs,
                str(out) + ".metrics.json",
                str(out) + ".samples.jsonl",
                EvaluateSettings.from_dict(exp_cfg["evaluate"]),
                args.experiment,
                models=("tuned",),
            )
            samples = [json.loads(ln)["tuned"] for ln in Path(str(out) + ".samples.jsonl").read_text().splitlines()]
            row = {
                "onto": onto,
                "dtype": dtype,
                main: metrics["tuned"][main],
                "adapter_4bit_" + main: run_metrics["adapter_4bit"][main],
                "gap_points": round(100 * (run_metrics["adapter_4bit"][main] - metrics["tuned"][main]), 2),
                "loss": metrics["tuned"]["loss"],
                "adapter_4bit_loss": run_metrics["adapter_4bit"]["loss"],
                "generations_identical_to_adapter": sum(a == b for a, b in zip(samples, adapter_samples, strict=True))
                / len(samples),
                "merge_error_ratio": report["merge_error_ratio"],
                "max_abs_logit_diff": report["max_abs_logit_diff"],
                "size_mb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 1),
                "merge_s": round(merge_s, 1),
                "eval_s": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {
        "experiment": args.experiment,
        "main_metric": main,
        "test_rows": run_metrics["generated_rows"],
        "adapter_4bit": {main: run_metrics["adapter_4bit"][main], "loss": run_metrics["adapter_4bit"]["loss"]},
        "base_model": manifest["base_model"]["id"],
        "base_dtype": manifest["base_model"].get("dtype"),
        "policies": rows,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
