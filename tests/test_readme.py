"""README's configuration snippets are real configuration: each YAML block, laid over the embedded
default, passes the schema and the reference checks the workflow runs at parse time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kiln.config import extend_default, validate

REPO = Path(__file__).resolve().parents[1]
# What README abbreviates, and the value the test puts in its place (nothing else is edited).
ABBREVIATIONS = {"[3b4c…]": "[" + "3b4c" * 16 + "]", "{...}": "{}"}


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_yaml_snippets():
    assert len(yaml_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(yaml_blocks())))
def test_each_readme_yaml_snippet_is_a_valid_config(index):
    text = yaml_blocks()[index]
    for short, full in ABBREVIATIONS.items():
        text = text.replace(short, full)
    snippet = yaml.safe_load(text)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    resolved = validate(extend_default(config, snippet))  # as a --configfile extends the default
    for key, value in snippet.items():  # what the snippet says is what the workflow gets
        if isinstance(value, dict):
            assert set(value) <= set(resolved[key])


def test_a_user_config_extends_the_default():
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    user = {
        "results": "results/mine",
        "datasets": {"mine": {"sources": [{"name": "s", "kind": "local", "path": "x.jsonl"}]}},
        "experiments": {"mine": {"base": "default", "dataset": "mine", "training": {"max_steps": 3}}},
    }
    cfg = validate(extend_default(default, user))
    assert list(cfg["experiments"]) == ["mine"]  # the default experiment is not built
    assert set(cfg["datasets"]) == {"orders", "mine"} and "smollm2-135m" in cfg["models"]
    mine, base = cfg["experiments"]["mine"], default["experiments"]["default"]
    assert mine["model"] == "smollm2-135m" and mine["training"]["max_steps"] == 3
    assert mine["training"]["learning_rate"] == base["training"]["learning_rate"]
    assert cfg["results"] == "results/mine" and cfg["tracking"] == default["tracking"]


def test_readme_walkthrough_plans_only_the_users_experiment(tmp_path):
    """README's "your data -> your experiment -> your results": its my.yaml, its dry-run command."""
    import subprocess

    from conftest import SNAKEMAKE

    text = (REPO / "README.md").read_text()
    my_yaml = re.search(r"```yaml\n# my.yaml[^\n]*\n(.*?)```", text, flags=re.S).group(1)
    command = re.search(r"snakemake --cores 1 --configfile my.yaml -n", text)
    assert command, "README lost its dry-run command"
    (tmp_path / "my.yaml").write_text(my_yaml)
    (tmp_path / "data").mkdir()
    row = {"messages": [{"role": "user", "content": "My order is late."}, {"role": "assistant", "content": "Sorry!"}]}
    (tmp_path / "data" / "tickets.jsonl").write_text(json.dumps(row) + "\n")
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--cores", "1", "--configfile", "my.yaml", "-n"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "results/mine/tickets/metrics.json" in out and "results/mine/default/" not in out
    assert "is extended by additional config" not in out


def test_readme_merge_policy_table_is_the_committed_measurement():
    """README's merge-policy table is benchmarks/results/merge_policy.json, row by row, and the
    config's default is the policy that reproduced the adapter."""
    result = json.loads((REPO / "benchmarks" / "results" / "merge_policy.json").read_text())
    text = (REPO / "README.md").read_text()
    for p in result["policies"]:
        row = (
            f"| {p['onto']} | {p['dtype']} | {p['exact_match']:.3f} | {p['gap_points']:.2f} | "
            f"{p['generations_identical_to_adapter']:.0%} | {p['loss']:.4f} | {p['size_mb']:.0f} MB |"
        )
        assert row in text, row
    assert result["date"] in text
    best = [p for p in result["policies"] if p["gap_points"] <= 1.0]
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["experiments"]["default"]["merge"]
    assert default["onto"] in {p["onto"] for p in best}
    assert any(p["onto"] == default["onto"] and p["dtype"] == result["base_dtype"] for p in best)


def test_readme_gpu_ratios_are_the_committed_h200_records():
    """README's fair GPU comparison: Kiln's stage against each peer's best, from the records."""
    folder = REPO / "benchmarks" / "results" / "train_gpu_fair_h200"
    parts = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in sorted(folder.glob("part_f*.jsonl"))}

    def best(part: str, runner: str) -> float:
        rows = [r for r in parts[part] if r.get("runner") == runner and r.get("tokens_per_s")]
        return max(r["tokens_per_s"] for r in rows if not r.get("documented_default"))

    kiln = best("part_f3", "kiln train stage")
    ratios = [
        kiln / best("part_f3", "plain unsloth loop"),
        kiln / best("part_f2", "unsloth + TRL SFTTrainer"),
        kiln / best("part_f1", "plain hf loop"),
    ]
    row = f"{kiln:,.0f} tokens/s: " + " / ".join(f"{r:.2f}x" for r in ratios)
    assert row in (REPO / "README.md").read_text(), row


def test_readme_gpu_shapes_and_lever_are_the_committed_h200_records():
    """README's rows for the two more shapes (parts f5a, f5b) and the Liger lever (part f8)."""
    folder = REPO / "benchmarks" / "results"

    def rows(path: str) -> list[dict]:
        return [json.loads(x) for x in (folder / path).read_text().splitlines()]

    def best(part: list[dict], runner: str) -> float:
        return max(r["tokens_per_s"] for r in part if r.get("runner") == runner and r.get("tokens_per_s"))

    a, b = rows("train_gpu_shapes_h200/part_f5a.jsonl"), rows("train_gpu_shapes_h200/part_f5b.jsonl")
    ka, kb = best(a, "kiln train stage"), best(b, "kiln train stage")
    ra, rb = ka / best(a, "plain unsloth loop"), kb / best(b, "plain unsloth loop")
    lever = {r["name"]: r for r in rows("train_gpu_levers_h200/part_f8.jsonl") if r.get("kind") == "train"}
    liger, own = lever["kiln_stage_auto_liger_fixed"], lever["kiln_stage_auto_model_loss"]
    assert liger["lm_head_loss"] == "liger" and own["lm_head_loss"] == "model"
    fast, slow = liger["tokens_per_s"], own["tokens_per_s"]
    drift = max(abs(x[1] - y[1]) / y[1] for x, y in zip(liger["losses"], own["losses"], strict=True))
    readme = (REPO / "README.md").read_text()
    for quoted in (
        f"{ra:.2f}x / {rb:.2f}x ({ka:,.0f} / {kb:,.0f} tokens/s)",
        f"{fast / slow:.2f}x ({fast:,.0f} vs {slow:,.0f}",
        f"ran {ra:.2f}x (Qwen2.5-0.5B, seq 4096) and {rb:.2f}x (Qwen2.5-1.5B, seq 2048)",
    ):
        assert quoted in readme, quoted
    assert drift < 2e-6 and "loss curves within 0.0002%" in readme


def test_readme_run_figures_are_the_committed_run_times():
    """README's default-run table, its time line and the CI figures come from
    benchmarks/results/run_times.json (benchmarks/run_times.py writes both)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from run_times import metrics_rows, readme_sentences

    record = json.loads((REPO / "benchmarks" / "results" / "run_times.json").read_text())
    readme = " ".join((REPO / "README.md").read_text().split())
    for line in readme_sentences(record) + metrics_rows(record):
        assert " ".join(line.split()) in readme, line


def test_readme_gguf_figures_are_the_committed_measurement():
    r = json.loads((REPO / "benchmarks" / "results" / "gguf_export.json").read_text())
    readme = " ".join((REPO / "README.md").read_text().split())
    sp, sv = r["speed"], r["serving"]
    for quoted in (
        f"ran {sp['best_llama_cpp']['tokens_per_s']:.1f} tokens/s",
        f"(batch {sp['best_transformers']['batch']}) {sp['best_transformers']['tokens_per_s']:.1f}:",
        f"{sp['ratio_best_llama_cpp_over_best_transformers']:.2f}x",
        f"{sv['schema_bound']['valid']:.0%} of the answers validated",
        f"f16 within {r['logprobs']['f16']['max_abs_prob_diff']:.4f}",
        f"q8_0 within {r['logprobs']['q8_0']['max_abs_prob_diff']:.3f}",
        r["date"],
    ):
        assert quoted in readme, quoted


def test_readme_packing_race_is_the_committed_h200_records():
    """README's packed-rows table and loss line (issue 23's race, parts p1, p2, p3): from the records,
    each Kiln packed run isolated (the check before training and the varlen kernel's calls)."""
    folder = REPO / "benchmarks" / "results" / "train_gpu_packing_correct_h200"

    def rows(part: str) -> list[dict]:
        return [json.loads(x) for x in (folder / f"part_{part}.jsonl").read_text().splitlines()]

    readme = (REPO / "README.md").read_text()
    for part, shape in (("p1", "SmolLM2-135M"), ("p3", "Qwen2.5-0.5B")):
        runs = [r for r in rows(part) if r.get("kind") == "train"]
        kiln = {r["packing"]: r for r in runs if r["runner"] == "kiln train stage"}
        packed, unpacked = kiln[True], kiln[False]
        assert packed["attention"]["isolation"]["isolated"] and packed["attention"]["varlen_calls"] > 0
        assert "varlen" in packed["attention"]["kernel"]
        peers = [r for r in runs if r["runner"] == "unsloth + TRL SFTTrainer" and r.get("tokens_per_s")]
        best = max((r for r in peers if not r.get("documented_default")), key=lambda r: r["tokens_per_s"])
        default = next(r for r in peers if r.get("documented_default"))
        k, u = packed["tokens_per_s"], unpacked["tokens_per_s"]
        assert k / u >= 3 and k / best["tokens_per_s"] >= 1.5  # the targets
        cells = [
            f"{k:,.0f}",
            f"{u:,.0f} (packed {k / u:.2f}x)",
            f"{best['tokens_per_s']:,.0f}, {best['micro_batch']} x 1 (packed {k / best['tokens_per_s']:.2f}x)",
            f"{default['tokens_per_s']:,.0f}",
        ]
        row = next(line for line in readme.splitlines() if line.startswith(f"| {shape} |"))
        assert all(c in row for c in cells), (row, cells)
    loss = {r["name"]: r["eval_loss"][-1] for r in rows("p2") if r.get("kind") == "train"}
    p, u = loss["loss_packed"], loss["loss_unpacked"]
    assert abs(p / u - 1) <= 0.03  # the tolerance set before the run
    assert f"packed {p:.3f} vs unpacked {u:.3f} ({100 * (p / u - 1):+.1f}%" in " ".join(readme.split())
    for withdrawn in ("227,589 (6.3x)", "from 35,883 to 227,589", "| H100: packing"):
        assert withdrawn not in readme
