"""The whole workflow on a tiny random-weights model, through real `snakemake` runs."""

import copy
import json
import math
import os
import signal
import subprocess
import time

import torch
from conftest import tiny_config
from safetensors.torch import load_file

from kiln.checkpoints import incomplete_reason


def test_tiny_pipeline_end_to_end(tiny_run):
    wf = tiny_run
    # Every raw row ends in the dataset or in a rejected file with a reason.
    import datasets
    import pyarrow.parquet as pq

    raw = pq.read_table(wf.path("data/orders/raw/synthetic/synthetic.parquet"))
    rejected = pq.read_table(wf.path("data/orders/rejected/synthetic/synthetic.parquet"))
    build_rejected = pq.read_table(wf.path("data/orders/build_rejected.parquet"))
    dd = datasets.load_from_disk(str(wf.path("data/orders/dataset")))
    assert raw.num_rows == rejected.num_rows + build_rejected.num_rows + sum(len(dd[s]) for s in dd)
    assert rejected.num_rows > 0 and all(rejected.column("reason").to_pylist())

    # Loss logged, finite, every step once.
    steps = [json.loads(x) for x in wf.path("tiny/train_log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in steps if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert any("eval_loss" in r for r in steps)
    summary = json.loads(wf.path("tiny/train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens_trained"] > 0 and summary["backend"] == "hf"
    assert summary["compute_dtype"] == "float32" and summary["peak_memory"]["cpu_max_rss_mb"] > 0
    assert summary["lora_gemms"] == "separate" and "the backend is hf" in summary["lora_gemms_reason"]
    assert wf.path("tiny/loss.png").read_bytes()[:4] == b"\x89PNG"

    # The adapter holds only LoRA weights, all float32 on the CPU path, and B moved away from its zero init.
    adapter = load_file(wf.path("tiny/adapter/adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    trained = json.loads(wf.path("tiny/adapter/experiment.json").read_text())
    assert trained["quantization"] == "nf4" and trained["base_identity"]["name"] == "tiny"
    # experiment.json carries what made the adapter: merge, evaluate, the manifest and repro read it.
    assert trained["dataset"]["name"] == "orders" and trained["model"]["kind"] == "random"
    raw_sources = wf.config["datasets"]["orders"]["sources"]  # as written; the record has defaults filled
    assert all(s.items() >= r.items() for s, r in zip(trained["dataset"]["sources"], raw_sources, strict=True))
    assert trained["training"]["max_steps"] == wf.config["experiments"]["tiny"]["training"]["max_steps"]
    manifest = json.loads(wf.path("tiny/manifest.json").read_text())
    assert manifest["config"]["dataset"] == trained["dataset"] and manifest["config"]["model"] == trained["model"]
    assert manifest["config"]["experiment"]["training"] == trained["training"]

    # The base weights on disk are untouched by training.
    from kiln.base_model import sha256_file

    identity = json.loads(wf.path("base/tiny/identity.json").read_text())
    for name, digest in identity["weights"].items():
        assert sha256_file(wf.path("base/tiny", name)) == digest

    # merged == the NF4-rounded base the adapter was trained against + adapter, by logits (the
    # rule's own check) and by weights, saved in the base's dtype (bfloat16: its rounding only).
    from kiln.merge import load_base

    report = json.loads(wf.path("tiny/merge_report.json").read_text())
    assert report["merge_onto"] == "dequantized" and report["merge_error_ratio"] < 0.05
    assert report["saved_dtype"] == identity["dtype"] == "bfloat16"
    merged = load_file(wf.path("tiny/merged/model.safetensors"))
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    rounded = load_base(str(wf.path("base/tiny")), "dequantized", "cpu").state_dict()
    cfg = json.loads(wf.path("tiny/adapter/adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    key = "model.layers.0.self_attn.q_proj"
    delta = adapter[f"base_model.model.{key}.lora_B.weight"] @ adapter[f"base_model.model.{key}.lora_A.weight"]
    expected = (rounded[f"{key}.weight"].float() + scale * delta).to(torch.bfloat16).float()
    assert torch.allclose(merged[f"{key}.weight"].float(), expected, rtol=1e-2, atol=1e-4)

    # Metrics: the same keys for every model.
    metrics = json.loads(wf.path("tiny/metrics.json").read_text())
    keys = {"loss", "perplexity", "exact_match", "valid_json", "field_accuracy", "mean_field_accuracy"}
    for model in ("base", "tuned", "adapter_4bit"):
        assert keys <= set(metrics[model]), model
        assert math.isfinite(metrics[model]["loss"])
    assert metrics["generated_rows"] == len(wf.path("tiny/samples.jsonl").read_text().splitlines())
    sample = json.loads(wf.path("tiny/samples.jsonl").read_text().splitlines()[0])
    assert {"prompt", "reference", "base", "tuned", "adapter_4bit"} <= set(sample)


def test_merged_model_loads_with_plain_transformers_and_stops_at_end_of_turn(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = str(tiny_run.path("tiny/merged"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    out = pipeline("text-generation", model=model, tokenizer=tok)("hi", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("hi")
    report = json.loads(tiny_run.path("tiny/merge_report.json").read_text())
    assert report["generation_eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


def test_adapter_loads_with_peft_from_any_directory(tiny_run, tmp_path):
    """The adapter folder names its base model by absolute path: PEFT finds it from another working
    directory (a relative one made `AutoPeftModelForCausalLM` fail with "Repo id must be in the
    form ..." anywhere but the project root)."""
    import sys

    adapter = tiny_run.path("tiny/adapter")
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, tiny_run.path("base/tiny"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys\n"
        "from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(sys.argv[1]).base_model_name_or_path)\n"
        "p = PeftModel.from_pretrained(base, sys.argv[1])\n"
        "print(type(m).__name__, type(p).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(adapter)], cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["PeftModelForCausalLM", "PeftModelForCausalLM"]


def test_second_run_does_nothing(tiny_run):
    assert tiny_run.planned_rules() == {}
    proc = tiny_run.run()
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changed_parameters_rerun_only_what_follows(tiny_run, tmp_path):
    wf = copy.copy(tiny_run)
    original = copy.deepcopy(wf.config)
    try:
        cfg = copy.deepcopy(original)
        cfg["datasets"]["orders"]["clean"]["min_chars"] = 12
        wf.write_config(cfg)
        plan = wf.planned_rules()
        audit = {"manifest", "publish", "compare", "data_report"}
        export = {"export_gguf", "ollama_modelfile"}
        assert (
            plan.keys() == {"clean", "build_dataset", "tokenize", "train", "merge", "evaluate", "all"} | audit | export
        )
        cfg = copy.deepcopy(original)
        cfg["experiments"]["tiny"]["tokenize"]["max_seq_len"] = 160
        wf.write_config(cfg)
        plan = wf.planned_rules()
        assert plan.keys() == {"tokenize", "train", "merge", "evaluate", "all"} | audit | export
        cfg = copy.deepcopy(original)
        cfg["experiments"]["tiny"]["evaluate"]["max_new_tokens"] = 9
        wf.write_config(cfg)
        # The manifest, the published model and the comparison follow the metrics.
        assert wf.planned_rules().keys() == {"evaluate", "manifest", "publish", "compare", "all"}
    finally:
        wf.write_config(original)
    assert wf.planned_rules() == {}


def test_new_local_file_is_collected_and_cleaned_alone(workflow_factory):
    cfg = tiny_config()
    cfg["datasets"]["orders"]["sources"].append({"name": "mine", "kind": "local", "path": "incoming/*.jsonl"})
    wf = workflow_factory(cfg)
    inbox = wf.workdir / "incoming"
    inbox.mkdir()
    row = {
        "messages": [
            {"role": "user", "content": "Order: 2 kettles for Ann Lee in Oslo, 12.5 each, 2025-05-01"},
            {
                "role": "assistant",
                "content": json.dumps(
                    {
                        "customer": "Ann Lee",
                        "product": "kettle",
                        "quantity": 2,
                        "unit_price": 12.5,
                        "city": "Oslo",
                        "date": "2025-05-01",
                    }
                ),
            },
        ]
    }
    (inbox / "a.jsonl").write_text(json.dumps(row) + "\n")
    target = "results/data/orders/dataset_stats.json"
    wf.run(target)
    assert wf.planned_rules(target) == {}
    time.sleep(1)
    row["messages"][0]["content"] = row["messages"][0]["content"].replace("Ann Lee", "Bo Li")
    (inbox / "b.jsonl").write_text(json.dumps(row).replace("Ann Lee", "Bo Li") + "\n")
    plan = wf.planned_rules(target)
    assert plan == {"collect": 1, "clean": 1, "build_dataset": 1}
    wf.run(target)
    assert wf.path("data/orders/clean/mine/b.jsonl.parquet").exists()
    stats = json.loads(wf.path("data/orders/dataset_stats.json").read_text())
    assert stats["rows_in"] >= 2


def test_killed_training_resumes_from_its_checkpoint(workflow_factory):
    cfg = tiny_config(max_steps=8, save_steps=2, eval_steps=0)
    cfg["models"]["tiny"]["architecture"].update(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    wf = workflow_factory(cfg)
    target = "results/tiny/train_summary.json"
    proc = subprocess.Popen(
        wf.command(target, cores=1),
        cwd=wf.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = wf.path("checkpoints/tiny")
    deadline = time.time() + 400
    while time.time() < deadline and not list(ckpt.glob("checkpoint-4")):
        time.sleep(0.5)
    assert list(ckpt.glob("checkpoint-4")), "no checkpoint appeared"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not wf.path("tiny/train_summary.json").exists()
    # The newest complete checkpoint (a kill during a save leaves an incomplete one, skipped).
    done_before = max(int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*") if incomplete_reason(p) is None)
    assert done_before < 8
    # A SIGKILL leaves Snakemake's lock behind, as after a power loss: the plain rerun, with no
    # --unlock and no --rerun-incomplete to remember, removes it (saying so) and finishes.
    rerun = wf.run(target)
    assert "Kiln: removed a stale lock" in rerun.stdout + rerun.stderr
    summary = json.loads(wf.path("tiny/train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from_step"] == done_before
    rows = [json.loads(x) for x in wf.path("tiny/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # each step once
    assert any(r.get("resumed_from") == done_before for r in rows)

    # New data makes the old checkpoints stale: they are set aside, never continued.
    cfg["datasets"]["orders"]["sources"][0]["rows"] = 70
    wf.write_config(cfg)
    wf.run(target)
    summary = json.loads(wf.path("tiny/train_summary.json").read_text())
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 8
    assert list(ckpt.parent.glob("tiny.stale-*"))
    assert "were made from other inputs" in wf.path("logs/train/tiny.log").read_text()


def test_experiments_share_the_stages_they_have_in_common(workflow_factory):
    cfg = tiny_config()
    cfg["experiments"]["tiny_lr"] = copy.deepcopy(cfg["experiments"]["tiny"])
    cfg["experiments"]["tiny_lr"]["training"]["learning_rate"] = 0.01
    cfg["experiments"]["tiny_long"] = copy.deepcopy(cfg["experiments"]["tiny"])
    cfg["experiments"]["tiny_long"]["tokenize"]["max_seq_len"] = 256
    plan = workflow_factory(cfg).planned_rules()
    assert plan["collect"] == plan["clean"] == plan["build_dataset"] == plan["base_model"] == 1
    assert plan["tokenize"] == 2  # two tokenize settings, three experiments
    assert plan["train"] == plan["merge"] == plan["evaluate"] == 3


def test_a_sweep_shares_every_stage_before_training(workflow_factory):
    cfg = tiny_config()
    cfg["sweeps"] = {"lr": {"base": "tiny", "grid": {"training.learning_rate": [0.001, 0.002, 0.004]}}}
    plan = workflow_factory(cfg).planned_rules()
    assert plan["collect"] == plan["clean"] == plan["build_dataset"] == plan["tokenize"] == 1
    assert plan["train"] == plan["merge"] == plan["evaluate"] == plan["manifest"] == 4  # tiny + 3 swept
    assert plan["compare"] == 1
