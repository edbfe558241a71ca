"""The tiny pipeline on a CUDA card, once per backend (skipped without CUDA: CI has none).

Run on the lent GPU machine; results of the full-size runs are in benchmarks/results/.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, train_paths

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["auto", "hf", "unsloth"])
def test_tiny_pipeline_on_cuda(workflow_factory, backend):
    if backend != "hf":
        pytest.importorskip("unsloth")
    wf = workflow_factory(tiny_config(backend=backend))
    wf.run()
    summary = json.loads(wf.path("tiny/train_summary.json").read_text())
    assert summary["device"] == "cuda" and summary["compute_dtype"] == "bfloat16"
    assert summary["backend"] == ("unsloth" if backend == "auto" else backend)
    if backend == "auto":
        assert summary["backend_reason"] == "auto: CUDA is available and unsloth is installed"
    assert summary["peak_memory"]["gpu_max_allocated_mb"] > 0
    report = json.loads(wf.path("tiny/merge_report.json").read_text())
    assert report["saved_dtype"] == "bfloat16" and report["merge_error_ratio"] < 0.05
    metrics = json.loads(wf.path("tiny/metrics.json").read_text())
    assert all(k in metrics for k in ("base", "tuned", "adapter_4bit"))


def test_auto_micro_batch_keeps_the_effective_batch(tiny_run_or_base, tmp_path):
    """On the card: the probe picks the largest micro-batch that fits and the effective batch stays."""
    from kiln.spec import TokenizeSettings, TrainingSettings
    from kiln.train import train

    base_dir, tokenized = tiny_run_or_base
    settings = _settings(per_device_batch_size=4, gradient_accumulation_steps=2, auto_micro_batch=True, backend="hf")
    summary = train(
        train_paths(tokenized, base_dir, tmp_path),
        settings=TrainingSettings.from_dict(settings),
        tokenize=TokenizeSettings(max_seq_len=192, assistant_only_loss=True, packing=False),
        data_fingerprints={"train": "x"},
        experiment="gpu-auto",
    )
    # A 2-layer model fits easily: the whole effective batch of 8 in one micro-batch.
    assert summary["micro_batch"] * summary["gradient_accumulation_steps"] == 8
    tried = {str(k): v for k, v in summary["micro_batch_probe"]["peak_gib_by_micro_batch"].items()}
    assert summary["micro_batch"] == 8 and list(tried) == ["8"] and tried["8"] > 0


def test_auto_micro_batch_says_when_nothing_fits(tiny_run_or_base):
    from transformers import AutoModelForCausalLM

    from kiln.microbatch import auto_micro_batch

    base_dir, _ = tiny_run_or_base
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).cuda()
    with pytest.raises(RuntimeError, match="not even a micro-batch of 1 x 64 tokens fits"):
        auto_micro_batch(model, 4, 64, torch.bfloat16, budget=1e-9)


@pytest.fixture(scope="module")
def tiny_run_or_base(tmp_path_factory):
    """The tiny workflow's base model and tokenized data, built once on the card."""
    from conftest import Workflow

    wf = Workflow(tmp_path_factory.mktemp("gpu-tiny"), tiny_config(backend="hf"))
    wf.run("results/tiny/train_summary.json")  # builds the data, the base model and the tokens
    tokenized = next(p for p in wf.path("data/orders/tokenized").iterdir() if p.is_dir())
    return wf.path("base/tiny"), tokenized


def _settings(**over) -> dict:
    from kiln.config import training_settings

    return training_settings(
        {**tiny_config()["experiments"]["tiny"]["training"], "max_steps": 2, "eval_steps": 0, **over}
    )


@pytest.mark.skipif(not __import__("importlib").util.find_spec("liger_kernel"), reason="needs liger-kernel")
def test_liger_sum_loss_is_torchs_cross_entropy():
    """kiln.losses.liger_sum_loss on the card: the summed NLL and the gradients of torch's own
    LM head + cross-entropy (bf16 inputs, as the lean step gives them)."""
    from kiln.losses import liger_sum_loss

    torch.manual_seed(0)
    w = (torch.randn(4096, 256, device="cuda") * 0.05).to(torch.bfloat16)  # the frozen (tied) head
    h = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 4096, (300,), device="cuda")
    ours = liger_sum_loss()(w, h, t)
    ours.backward()
    gh = h.grad.clone()
    h.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.T).float(), t, reduction="sum")
    ref.backward()
    assert torch.allclose(ours.float(), ref, rtol=2e-3), (ours, ref)
    err = (gh.float() - h.grad.float()).abs().max().item()
    assert err <= 0.02 * h.grad.float().abs().max().item(), err


@pytest.fixture(scope="module")
def packed_inputs(tmp_path_factory):
    from packcheck import base_and_dataset

    return base_and_dataset(tmp_path_factory.mktemp("gpu-packed"))


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_a_packed_batch_loss_is_the_sum_of_its_documents_alone_on_cuda(packed_inputs, tmp_path, backend):
    """tests/test_packing.py's check on the card, per backend, through the trainer kiln.train builds:
    a batch of its own get_train_dataloader() reaches the model padding-free, its summed loss is the
    sum of its documents' alone (1e-5 relative), the documents as one causal
    sequence are far from it, and the kernel is a varlen one (no T x T mask)."""
    import json as _json

    from packcheck import packed_job, packed_vs_alone

    if backend == "unsloth":
        pytest.importorskip("unsloth")
        import unsloth  # noqa: F401  (before transformers, as the train rule does)
    base, dataset = packed_inputs
    job = packed_job(base, dataset, tmp_path, backend=backend, auto_micro_batch=False)
    r = packed_vs_alone(job)
    print("PACKCHECK", backend, _json.dumps(r))
    assert r["shape"][0] == 1 and r["has_position_ids"] and r["documents"] > 2, r
    assert r["packed"] == pytest.approx(r["alone"], rel=1e-5), r  # H200: 1e-7 (hf), 5e-7 (unsloth)
    assert abs(r["contaminated"] - r["alone"]) > 2e-4 * abs(r["alone"]), r  # H200: 8e-4 of it
    assert "varlen" in r["attention"]["kernel"] and r["isolation"]["isolated"], r


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_fused_lora_gemms_give_unsloths_loss_and_gradients_on_cuda(tmp_path, model_type):
    """kiln.fused_lora on an Unsloth model (NF4, bf16), against the same model without it: the loss of a
    batch and every LoRA gradient. Qwen2 (q/k/v biases: Unsloth runs PEFT's layers there) and Llama
    (Unsloth's own fused LoRA kernels). Bars, set before the first run on a card: loss within 1e-3
    relative, each gradient's error norm within 2% of its norm (bf16 rounding, additions reordered)."""
    pytest.importorskip("unsloth")
    import unsloth  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM
    from unsloth import FastLanguageModel

    from kiln import fused_lora

    cfg = AutoConfig.for_model(
        model_type, hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    for f in (Path(__file__).parent / "fixtures" / "smollm2-tokenizer").iterdir():  # Unsloth loads one
        shutil.copy(f, tmp_path / "m" / f.name)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), max_seq_length=256, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, use_gradient_checkpointing=False, random_state=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # B = 0 at init would leave A's gradients zero
    ids = torch.randint(0, 49152, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def loss_and_grads():
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), [p.grad.float().clone() for p in params]

    model.train()
    plain_loss, plain_grads = loss_and_grads()
    done = fused_lora.install(model)
    assert done["qkv"] == done["o"] == done["mlp"] == 2 and not done["left"], done
    fused_loss, fused_grads = loss_and_grads()
    print("FUSEDCHECK", model_type, float(plain_loss), float(fused_loss))
    assert fused_loss == pytest.approx(float(plain_loss), rel=1e-3)
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(fused_grads, plain_grads))
    print("FUSEDCHECK worst gradient error", model_type, worst)
    assert worst <= 0.02, worst
