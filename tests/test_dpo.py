"""DPO training (issue 27): Kiln's pair tokens are TRL's, the CPU log-probability kernel computes
what the logits say, the reference is the SFT model itself, and a dpo experiment runs every stage
after training (merge, GGUF, evaluation with the preference block, card) in the tiny workflow,
depending on its SFT experiment in the DAG; the kill campaign comes back to the same outputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types

import pytest
import torch
from conftest import TOKENIZER, Workflow, tiny_config
from transformers import AutoTokenizer

from kiln.dpo import PlainChunkedLogProb
from kiln.pair_eval import pair_log_probs, preference_scores, reward_scores
from kiln.pair_tokens import PAIR_COLUMNS, pair_tokens
from kiln.records import to_canonical
from kiln.synthetic_pairs import generate_pairs


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_pair_tokens_are_the_ids_trls_dpo_trainer_makes(tokenizer, tmp_path):
    """Kiln tokenizes pairs in its cached stage; TRL's own _prepare_dataset on the same records must
    give the same prompt, chosen and rejected ids (a TRL upgrade that changes them fails here)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    records = generate_pairs(12, seed=1)
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    fake = types.SimpleNamespace(_tokenizer=tokenizer)
    theirs = DPOTrainer._prepare_dataset(
        fake, ds, tokenizer, DPOConfig(output_dir=str(tmp_path), max_length=None, use_cpu=True, bf16=False), "t"
    )
    for record, row in zip(records, theirs, strict=True):
        ours = pair_tokens(tokenizer, to_canonical(record)[2])
        assert ours == tuple(row[c] for c in PAIR_COLUMNS)
    assert all(len(row["chosen_ids"]) > 5 for row in theirs)


def test_the_plain_log_prob_kernel_is_log_softmax_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    logp, entropy, sq, mean, top1 = PlainChunkedLogProb.apply(
        hidden, weight, None, targets, 0.7, 4096, 30.0, 0.5, ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    )
    z = 30.0 * torch.tanh(hidden @ weight.T * 0.5 / 30.0) / 0.7
    ref = torch.log_softmax(z, -1)
    torch.testing.assert_close(logp, ref.gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1))
    torch.testing.assert_close(sq, torch.log((ref.exp() ** 2).sum(-1)))
    torch.testing.assert_close(mean, z.mean(-1))
    assert torch.equal(top1, z.argmax(-1) == targets)
    (g_ours,) = torch.autograd.grad(logp.sum(), hidden)
    (g_ref,) = torch.autograd.grad(ref.gather(-1, targets[:, None]).sum(), hidden)
    torch.testing.assert_close(g_ours, g_ref)


def test_scores_of_pairs():
    chosen, rejected = torch.tensor([-1.0, -5.0, -2.0]).numpy(), torch.tensor([-3.0, -4.0, -2.5]).numpy()
    s = preference_scores(chosen, rejected)
    assert s["preference_accuracy"] == pytest.approx(2 / 3) and s["mean_logp_margin"] == pytest.approx(
        (2 - 1 + 0.5) / 3
    )
    r = reward_scores((chosen, rejected), (chosen - 1, rejected), beta=0.5)
    assert r["reward_accuracy"] == 1.0 and r["mean_reward_margin"] == pytest.approx(0.5)


def _dpo_workflow(tmp_path, **training) -> Workflow:
    cfg = tiny_config()
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    rows = generate_pairs(60, seed=3)
    (tmp_path / "run" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["datasets"]["pairs"] = {
        "sources": [{"name": "p", "kind": "local", "path": "pairs.jsonl"}],
        "build": {"validation": 0.1, "test": 0.2, "seed": 0},
    }
    dpo = copy.deepcopy(cfg["experiments"]["tiny"])
    dpo["dataset"] = "pairs"
    dpo["training"].update(method="dpo", from_experiment="tiny", **training)
    cfg["experiments"]["tiny-dpo"] = dpo
    # KTO on pairs and on unpaired prompt/completion/label rows (another file of the same dataset)
    (tmp_path / "run" / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired_rows(40, 4)))
    cfg["datasets"]["labelled"] = {
        "sources": [
            {"name": "p", "kind": "local", "path": "pairs.jsonl"},
            {"name": "u", "kind": "local", "path": "unpaired.jsonl"},
        ],
        "build": {"validation": 0.1, "test": 0.2, "seed": 0},
    }
    kto = copy.deepcopy(cfg["experiments"]["tiny"])
    kto["dataset"] = "labelled"
    kto["training"].update(method="kto", loss_type="kto", from_experiment="tiny")
    kto["export"] = {"gguf": []}
    cfg["experiments"]["tiny-kto"] = kto
    orpo = copy.deepcopy(dpo)
    orpo["training"].update(method="orpo", beta=0.2)
    orpo["export"] = {"gguf": []}
    cfg["experiments"]["tiny-orpo"] = orpo
    return Workflow(tmp_path / "run", cfg)


def unpaired_rows(n: int, seed: int) -> list[dict]:
    """KTO's unpaired format from generated pairs: each pair's chosen (label true) or rejected answer."""
    return [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, p in enumerate(generate_pairs(n, seed=seed))
    ]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    wf = _dpo_workflow(tmp_path_factory.mktemp("dpo"))
    wf.run()
    return wf


def test_the_reference_is_the_sft_model_and_the_first_loss_is_log_two(dpo_run):
    """TRL's reference log-probabilities (the frozen copy of the SFT adapter) equal the SFT model's
    own, scored outside TRL; the policy starts there, so the first step's DPO loss is ln 2."""
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kiln.dpo import dpo_trainer_class, ensure_logprob_kernel, load_policy
    from kiln.pref_train import PreferenceJob  # noqa: F401 (the recipe this test's trainer mirrors)

    ensure_logprob_kernel()
    base_dir, sft = dpo_run.path("base/tiny"), dpo_run.path("tiny/adapter")
    tokenized = next(dpo_run.path("data/pairs/tokenized").glob("tiny-*[!.json]"))
    pairs = datasets.load_from_disk(str(tokenized))["train"].select(range(6)).select_columns(list(PAIR_COLUMNS))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    from trl import DPOConfig

    args = DPOConfig(
        output_dir=str(dpo_run.workdir / "t"), use_cpu=True, bf16=False, per_device_train_batch_size=6, report_to=[]
    )
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    trainer = dpo_trainer_class()(
        model=load_policy(base, str(sft)), args=args, train_dataset=pairs, processing_class=tok
    )
    batch = trainer.data_collator([pairs[i] for i in range(6)])
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    sft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), str(sft)
    ).eval()
    ours_c, ours_r = pair_log_probs(sft_model, pairs.to_dict(), tok.pad_token_id, 10_000)
    torch.testing.assert_close(ref_c.double(), torch.tensor(ours_c), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref_r.double(), torch.tensor(ours_r), rtol=1e-4, atol=1e-3)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and not any(".ref." in n for n in trainable)  # the reference copy is frozen
    log = [json.loads(line) for line in dpo_run.path("tiny-dpo/train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_a_dpo_experiment_runs_every_stage_after_training(dpo_run):
    metrics = json.loads(dpo_run.path("tiny-dpo/metrics.json").read_text())
    pref = metrics["preference"]
    assert (pref["method"], pref["from_experiment"]) == ("dpo", "tiny")
    assert pref["pairs"] == pref["base"]["pairs"] == pref["tuned"]["pairs"] > 5
    for kind in ("base", "sft", "tuned"):
        assert 0 <= pref[kind]["preference_accuracy"] <= 1
    assert {"reward_accuracy", "mean_reward_margin", "beta"} <= set(pref["tuned"])
    # the SFT task's metrics of the SFT model beside the DPO model's, on the same test rows
    sft = json.loads(dpo_run.path("tiny/metrics.json").read_text())
    assert metrics["sft"]["same_rows"] and metrics["sft"]["exact_match"] == sft["tuned"]["exact_match"]
    assert metrics["generated_rows"] == sft["generated_rows"]
    summary = json.loads(dpo_run.path("tiny-dpo/train_summary.json").read_text())
    assert summary["preference"]["from_experiment"] == "tiny" and summary["backend"] == "hf"
    record = json.loads(dpo_run.path("tiny-dpo/adapter/experiment.json").read_text())
    assert record["training"]["method"] == "dpo" and len(record["data_fingerprints"]["sft_adapter"]) == 64
    assert dpo_run.path("tiny-dpo/merge_report.json").exists() and dpo_run.path("tiny-dpo/model/README.md").exists()
    gguf = json.loads(next(dpo_run.path("tiny-dpo/gguf").glob("*.json")).read_text())
    assert gguf["ok"] and gguf["problems"] == []
    assert "gguf_q8_0" in metrics
    # the base on the SFT task: the SFT experiment's scores, same rows and settings, not generated again
    assert metrics["base"]["scored_in"] == "tiny" and metrics["base"]["exact_match"] == sft["base"]["exact_match"]
    # served as any model: `kiln serve` on the DPO model's GGUF answers a schema-bound request
    from test_families import served_json

    assert served_json(dpo_run, "tiny-dpo")


def test_a_kto_experiment_trains_from_the_sft_adapter_and_runs_every_stage(dpo_run):
    """KTO on pairs and unpaired rows: TRL's KTOTrainer from the SFT adapter (policy = reference at
    the start, so every answer's loss is 1 - sigmoid(0): the first loss is 0.5), then merge,
    evaluation (held-out pairs, and the unpaired answers' rewards against their labels), the card."""
    summary = json.loads(dpo_run.path("tiny-kto/train_summary.json").read_text())
    assert summary["preference"]["method"] == "kto" and summary["backend"] == "hf" and summary["steps"] == 4
    assert summary["lm_head_loss"] == "trl_kto" and "rewards/chosen" in " ".join(summary["preference"]["final_rewards"])
    log = [json.loads(line) for line in dpo_run.path("tiny-kto/train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-3)
    stats = json.loads(next(dpo_run.path("data/labelled/tokenized").glob("tiny-*.json")).read_text())
    assert stats["splits"]["train"]["pairs"] > 10 and stats["splits"]["train"]["unpaired"] > 10
    pref = json.loads(dpo_run.path("tiny-kto/metrics.json").read_text())["preference"]
    assert pref["method"] == "kto" and pref["pairs"] == pref["tuned"]["pairs"] > 0
    u = pref["unpaired"]
    assert u["rows"] == u["desirable"] + u["undesirable"] > 0 and 0 <= u["label_accuracy"] <= 1
    assert dpo_run.path("tiny-kto/merge_report.json").exists()
    card = dpo_run.path("tiny-kto/model/README.md").read_text()
    assert "Preference tuning (kto, from `tiny`)" in card and "Held-out unpaired answers" in card


def test_an_orpo_experiment_runs_every_stage_and_its_loss_is_the_papers(dpo_run):
    """ORPO from the SFT adapter, no reference: TRL's ORPOTrainer on Kiln's pairs computes, on a batch,
    the chosen sequences' NLL minus beta x the mean log-sigmoid of the log odds ratio of the answers'
    mean log-probabilities, those Kiln's evaluation scores (kiln.pair_eval); every stage runs."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig

    from kiln.dpo import load_policy
    from kiln.orpo import orpo_trainer_class

    summary = json.loads(dpo_run.path("tiny-orpo/train_summary.json").read_text())
    assert summary["preference"]["method"] == "orpo" and summary["preference"]["reference"] == "none (orpo)"
    assert "log_odds_ratio" in summary["preference"]["final_rewards"] and summary["steps"] == 4
    pref = json.loads(dpo_run.path("tiny-orpo/metrics.json").read_text())["preference"]
    assert pref["method"] == "orpo" and pref["tuned"]["pairs"] > 0 and pref["tuned"].get("reward_accuracy") is None
    assert dpo_run.path("tiny-orpo/model/README.md").exists()

    base_dir, sft = dpo_run.path("base/tiny"), dpo_run.path("tiny/adapter")
    tokenized = next(dpo_run.path("data/pairs/tokenized").glob("tiny-*[!.json]"))
    pairs = datasets.load_from_disk(str(tokenized))["train"].select(range(4)).select_columns(list(PAIR_COLUMNS))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    args = ORPOConfig(
        output_dir=str(dpo_run.workdir / "t3"), use_cpu=True, bf16=False, beta=0.2, max_length=192,
        remove_unused_columns=False, report_to=[],
    )  # fmt: skip
    model = load_policy(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), str(sft))
    trainer = orpo_trainer_class()(model=model, args=args, train_dataset=pairs, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    rows = pairs.to_dict()
    chosen, rejected = pair_log_probs(trainer.model.eval(), rows, tok.pad_token_id, 192)
    n_c = torch.tensor([len(c) for c in rows["chosen_ids"]], dtype=torch.float64)
    n_r = torch.tensor([len(r) for r in rows["rejected_ids"]], dtype=torch.float64)
    lc, lr = torch.tensor(chosen) / n_c, torch.tensor(rejected) / n_r  # mean log-probability per token

    def log1mexp(x):
        return torch.log1p(-torch.exp(x))

    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    # TRL's NLL term covers the whole chosen sequence, prompt included ("orpo chosen nll loss is
    # computed over the full prompt and response", trl 1.15): every token after the first
    token_logps = []
    with torch.no_grad():
        for p, c in zip(rows["prompt_ids"], rows["chosen_ids"], strict=True):
            ids = torch.tensor([list(p) + list(c)])
            logp = torch.log_softmax(trainer.model(input_ids=ids).logits[0, :-1].double(), -1)
            token_logps.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1))
    nll = -torch.cat(token_logps).mean()
    expected = nll - 0.2 * torch.nn.functional.logsigmoid(log_odds).mean()
    assert loss == pytest.approx(float(expected), rel=1e-4)


def test_retraining_the_sft_experiment_retrains_the_dpo_one(dpo_run):
    original = copy.deepcopy(dpo_run.config)
    cfg = copy.deepcopy(original)
    cfg["experiments"]["tiny"]["training"]["learning_rate"] = 0.001
    try:
        dpo_run.write_config(cfg)
        plan = dpo_run.planned_rules("results/tiny-dpo/adapter")
    finally:
        dpo_run.write_config(original)
    assert plan.get("train") == 2  # the SFT adapter, then the DPO one that starts from it


def test_kiln_trace_shows_a_pair_from_its_raw_record_to_its_split(dpo_run):
    import subprocess

    import datasets
    from conftest import KILN

    row = datasets.load_from_disk(str(dpo_run.path("data/pairs/dataset")))["test"][0]
    out = subprocess.run(
        [*KILN, "trace", row["kiln_id"], "--dataset", "pairs", "--results", "results"],
        cwd=dpo_run.workdir, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    chosen, rejected = row["messages"][-2]["content"], row["messages"][-1]["content"]
    assert "(format preference)" in out.stdout and "=> in the test split" in out.stdout
    assert f"chosen: {chosen!r}" in out.stdout and f"rejected: {rejected!r}" in out.stdout


@pytest.mark.parametrize("method, dataset", [("dpo", "pairs"), ("kto", "labelled")])
def test_resuming_restores_the_policy_and_keeps_the_reference(dpo_run, method, dataset):
    """A DPO or KTO checkpoint holds the policy at its root and TRL's reference in ref/; transformers
    alone loads only ref/ when it sees it (the policy stayed the SFT adapter on resume). Kiln's
    trainers load the policy from the root and keep the reference the SFT adapter."""
    import datasets
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, KTOConfig

    from kiln.dpo import dpo_trainer_class, ensure_logprob_kernel, load_policy
    from kiln.kto import kto_trainer_class

    ensure_logprob_kernel()
    base_dir, sft = dpo_run.path("base/tiny"), dpo_run.path("tiny/adapter")
    ckpt = dpo_run.path(f"checkpoints/tiny-{method}/checkpoint-2")
    rows = next(dpo_run.path(f"data/{dataset}/tokenized").glob("tiny-*[!.json]"))
    train = datasets.load_from_disk(str(rows))["train"].select(range(4)).select_columns(list(PAIR_COLUMNS))
    config, trainer_class = {"dpo": (DPOConfig, dpo_trainer_class), "kto": (KTOConfig, kto_trainer_class)}[method]
    args = config(output_dir=str(dpo_run.workdir / "t2"), use_cpu=True, bf16=False, report_to=[])
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    trainer = trainer_class()(
        model=load_policy(base, str(sft)), args=args, train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(str(base_dir)), adapter_dtype=torch.float32,
    )  # fmt: skip
    trainer._load_from_checkpoint(str(ckpt))
    state = dict(trainer.model.named_parameters())

    def weights(adapter: str, saved) -> dict:
        return {k: state[k.replace(".weight", f".{adapter}.weight")] for k in saved}

    policy, sft_saved = (
        load_file(str(ckpt / "adapter_model.safetensors")),
        load_file(str(sft / "adapter_model.safetensors")),
    )
    assert any(not torch.equal(policy[k], sft_saved[k]) for k in policy)  # two steps moved it
    for k, p in weights("default", policy).items():
        assert torch.equal(p.detach(), policy[k]) and p.requires_grad and p.dtype == torch.float32, k
    for k, p in weights("ref", sft_saved).items():
        assert torch.equal(p.detach().float(), sft_saved[k].float()) and not p.requires_grad, k


@pytest.mark.slow
def test_a_dpo_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(dpo_run, tmp_path):
    """SIGKILL of the whole run once the DPO job has recorded a checkpoint, then the plain rerun: it
    resumes there, and the adapter is the uninterrupted run's, byte for byte (as the kill campaign
    holds SFT training to)."""
    import hashlib

    from killcampaign import WatchedRun

    wf = _dpo_workflow(tmp_path)
    target = "results/tiny-dpo/adapter"
    run = WatchedRun(wf.command(target), wf.workdir, tmp_path / "killed.log")
    pattern = "checkpoints/tiny-dpo/checkpoint-*/kiln_checkpoint.json"
    assert run.wait_new_file(wf.workdir / "results", pattern, "(no stage)", timeout=900), "no DPO checkpoint came"
    run.kill()  # while the DPO job trains on (its checkpoint just recorded)
    assert not wf.path("tiny-dpo/adapter").exists()
    wf.run(target)
    summary = json.loads(wf.path("tiny-dpo/train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 2 and summary["steps"] == 4, summary

    def digest(run_path) -> str:
        return hashlib.sha256(run_path("tiny-dpo/adapter/adapter_model.safetensors").read_bytes()).hexdigest()

    assert digest(wf.path) == digest(dpo_run.path)
    losses = [
        [r.get("loss") for r in map(json.loads, w.path("tiny-dpo/train_log.jsonl").read_text().splitlines())]
        for w in (wf, dpo_run)
    ]
    assert [x for x in losses[0] if x is not None] == [x for x in losses[1] if x is not None]


@pytest.mark.parametrize(
    "loss_type, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("sigmoid", 1.0)]
)
def test_each_offered_dpo_loss_trains(dpo_run, tmp_path, loss_type, sft_weight):
    """Every training.loss_type the schema offers runs TRL's loss through Kiln's stage (2 steps), and
    sft_weight adds TRL's sft loss (RPO) with that weight."""
    from conftest import train_paths

    from kiln.config import training_settings
    from kiln.dpo import dpo_args
    from kiln.pref_train import train_preference
    from kiln.spec import TokenizeSettings, TrainingSettings

    tiny = dpo_run.config["experiments"]["tiny-dpo"]["training"]
    settings = {**training_settings(), **tiny, "max_steps": 2, "eval_steps": 0, "loss_type": loss_type}
    settings["sft_weight"] = sft_weight
    settings["label_smoothing"] = 0.1 if loss_type == "robust" else 0.0
    tokenized = next(dpo_run.path("data/pairs/tokenized").glob("tiny-*[!.json]"))
    paths = train_paths(tokenized, dpo_run.path("base/tiny"), tmp_path)
    paths = dataclasses.replace(paths, start_adapter=str(dpo_run.path("tiny/adapter")))
    summary = train_preference(
        paths, settings=TrainingSettings.from_dict(settings), tokenize=TokenizeSettings(max_seq_len=192),
        data_fingerprints={"train": "x"}, experiment="t",
    )  # fmt: skip
    assert summary["steps"] == 2 and summary["preference"]["loss_type"] == loss_type
    assert math.isfinite(summary["final_loss"]) and summary["preference"]["sft_weight"] == sft_weight
    job = types.SimpleNamespace(
        s=TrainingSettings.from_dict(settings), ckpt=tmp_path, micro=2, accum=1, eval_ds=None, dtype=torch.float32,
        cuda=False, tokenize=TokenizeSettings(max_seq_len=192), experiment="t",
    )  # fmt: skip
    args = dpo_args(job, [])
    assert args.loss_type == ([loss_type, "sft"] if sft_weight else [loss_type])
    assert args.loss_weights == ([1.0, sft_weight] if sft_weight else None)


def test_after_every_test_above_the_dpo_workflow_has_nothing_to_do(dpo_run):
    """Last in the module: nothing the tests above did (reading the runs' files, dry runs with another
    config) leaves the workflow out of date; a rerun plans no job."""
    out = dpo_run.run(dry=True)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
