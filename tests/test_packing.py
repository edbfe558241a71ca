"""Packed rows never see each other: the real trainer's batches, losses and the refusal (CPU, hf)."""

import pytest
import torch
from packcheck import packed_job, packed_vs_alone, sharpen

from kiln.packing import PackedCollator, PackingError, check_isolation


@pytest.fixture(scope="module")
def sharp_base(tiny_run, tmp_path_factory):
    """The tiny base model with attention that depends on its context (packcheck.sharpen)."""
    return sharpen(tiny_run.path("base/tiny"), tmp_path_factory.mktemp("sharp"))


@pytest.mark.parametrize("step_metrics", [False, True], ids=["lean-step", "step-metrics"])
def test_a_packed_batch_loss_is_the_sum_of_its_documents_alone(tiny_run, sharp_base, tmp_path, step_metrics):
    """The trainer kiln.train builds (its constructor, collator and compute_loss), one batch of its own
    get_train_dataloader(): the summed NLL over labelled tokens equals the sum of each document's
    alone (float32 CPU, 1e-5 relative), and differs from the documents run as one causal sequence
    (what a contaminated run computes: the check can fail)."""
    job = packed_job(sharp_base, tiny_run.path("data/orders/dataset"), tmp_path, step_metrics=step_metrics)
    r = packed_vs_alone(job)
    assert r["shape"][0] == 1 and r["has_position_ids"] and r["documents"] > 2, r
    assert r["packed"] == pytest.approx(r["alone"], rel=1e-5), r
    assert abs(r["contaminated"] - r["alone"]) > 2e-4 * abs(r["alone"]), r  # 20x the tolerance
    assert r["attention"]["kernel"] == "sdpa, block-diagonal mask" and r["isolation"]["isolated"]


def test_a_model_that_lets_documents_see_each_other_is_refused(sharp_base):
    """check_isolation through a collator that marks no boundaries (what Unsloth's trainer did to
    Kiln's packed rows): refused with one line naming the key."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(sharp_base), dtype=torch.float32)
    good = PackedCollator(0)
    assert check_isolation(model, good, 1000)["isolated"]

    def one_sequence(rows):
        return good([{"input_ids": r["input_ids"], "seq_lengths": [len(r["input_ids"])]} for r in rows])

    with pytest.raises(PackingError, match=r"tokenize.packing: true, but .* attend to each other.*packing: false"):
        check_isolation(model, one_sequence, 1000)


def test_the_collator_marks_documents_for_each_kernel():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]}, {"input_ids": [4, 4]}]
    hf = PackedCollator(0)(rows)
    assert hf["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 4]] and "attention_mask" not in hf
    assert hf["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert hf["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4]]  # no document predicts another's first token
    assert hf["cu_seq_lens_q"].tolist() == [0, 3, 5, 7] and hf["max_length_q"] == 3
    unsloth = PackedCollator(0, "unsloth")(rows)
    assert unsloth["packed_seq_lengths"].tolist() == [3, 2, 2] and "cu_seq_lens_q" not in unsloth


# ---- every other forward over several documents at once: padded rows, each its own document -----
def _sharp_model_and_rows(tiny_run, sharp_base, n: int = 6):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(sharp_base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(sharp_base))
    tokenized = next(tiny_run.path("data/orders/tokenized").glob("tiny-*[!.json]"))
    rows = datasets.load_from_disk(str(tokenized))["test"]
    return model, tokenizer, rows.select(range(min(n, len(rows))))


def test_evaluation_and_regression_losses_are_each_rows_loss_alone(tiny_run, sharp_base):
    """kiln.passes.masked_loss (the evaluation loss without generation, and every regression set):
    a padded batch of rows of different lengths scores what each row scores alone."""
    from kiln.passes import masked_loss

    model, tokenizer, rows = _sharp_model_and_rows(tiny_run, sharp_base)
    assert len({len(x) for x in rows["input_ids"]}) > 1  # rows of different lengths: padding in play
    batched = masked_loss(model, rows, tokenizer.pad_token_id, batch_size=len(rows))
    alone = masked_loss(model, rows, tokenizer.pad_token_id, batch_size=1)
    assert batched["loss_tokens"] == alone["loss_tokens"] > 0
    assert batched["loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_evaluation_loss_and_generation_batched_are_each_rows_alone(tiny_run, sharp_base):
    """kiln.passes.loss_and_generate (left-padded prompts, answers after them, the cache reused for
    generation): the loss and the greedy outputs of a batch are those of each row alone."""
    from kiln.passes import loss_and_generate

    model, tokenizer, rows = _sharp_model_and_rows(tiny_run, sharp_base)
    shared = []
    for ids, mask in zip(rows["input_ids"], rows["assistant_masks"], strict=True):
        start = mask.index(1)
        shared.append((ids[:start], ids[start:], mask[start:]))
    batched, out_batched = loss_and_generate(model, tokenizer, shared, len(shared), 6)
    alone, out_alone = loss_and_generate(model, tokenizer, shared, 1, 6)
    assert batched["loss"] == pytest.approx(alone["loss"], rel=1e-5) and batched["loss_tokens"] == alone["loss_tokens"]
    assert out_batched == out_alone


def test_the_merge_checks_logits_of_a_padded_batch_are_each_prompts_alone(tiny_run, sharp_base):
    """kiln.merge compares base + adapter with the merged model on right-padded validation prompts,
    at the real (unpadded) positions: those logits are each prompt's alone."""
    from kiln.merge import _logits

    model, tokenizer, _ = _sharp_model_and_rows(tiny_run, sharp_base)
    texts = ["a short prompt", "a somewhat longer prompt about an order of ten plums", "x"]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    together = _logits(model, batch)[batch["attention_mask"].bool()]
    one_by_one = torch.cat(
        [_logits(model, tokenizer([t], return_tensors="pt", add_special_tokens=False))[0] for t in texts]
    )
    assert torch.allclose(together, one_by_one, atol=1e-4, rtol=1e-4)


def test_packed_tokens_keep_the_test_split_unpacked_and_regression_sets_unpack(tiny_run, tmp_path):
    """tokenize.packing packs what training reads (train, validation); the test split stays one row a
    document in the dataset's order (evaluation lines rows up with it), and a regression set
    tokenized with packing is scored document by document (kiln.evaluate.regression_rows)."""
    import datasets

    from kiln.evaluate import regression_rows
    from kiln.spec import TokenizeSettings
    from kiln.tokenize import tokenize_dataset

    base, dataset = tiny_run.path("base/tiny"), tiny_run.path("data/orders/dataset")
    for packing in (False, True):
        settings = {"max_seq_len": 512, "assistant_only_loss": True, "packing": packing}
        tokenize_dataset(
            dataset, base, tmp_path / str(packing), tmp_path / f"{packing}.json", TokenizeSettings.from_dict(settings)
        )
    plain = datasets.load_from_disk(str(tmp_path / "False"))
    packed = datasets.load_from_disk(str(tmp_path / "True"))
    assert "seq_lengths" in packed["train"].column_names and len(packed["train"]) < len(plain["train"])
    assert packed["test"]["input_ids"] == plain["test"]["input_ids"]
    a, b = regression_rows(str(tmp_path / "False"), 10_000), regression_rows(str(tmp_path / "True"), 10_000)
    assert len(a) == len(b) and sorted(a["input_ids"]) == sorted(b["input_ids"])
    assert sorted(zip(map(tuple, a["input_ids"]), map(tuple, a["assistant_masks"]))) == sorted(
        zip(map(tuple, b["input_ids"]), map(tuple, b["assistant_masks"]))
    )


def test_the_pipeline_with_packing_runs_to_the_end(workflow_factory):
    """`tokenize.packing: true` through every stage with Snakemake (train, merge, evaluate, GGUF):
    the run records the kernel and the isolation check, and evaluation scores the unpacked test rows."""
    import json

    from conftest import tiny_config

    config = tiny_config()
    config["experiments"]["tiny"]["tokenize"] |= {"packing": True, "max_seq_len": 512}
    wf = workflow_factory(config)
    wf.run()
    summary = json.loads(wf.path("tiny/train_summary.json").read_text())
    assert summary["attention"]["kernel"] == "sdpa, block-diagonal mask"
    assert summary["attention"]["isolation"]["isolated"] and summary["attention"]["isolation"]["leak"] < 1e-4
    metrics = json.loads(wf.path("tiny/metrics.json").read_text())
    assert metrics["tuned"]["loss_tokens"] == metrics["base"]["loss_tokens"] > 0
