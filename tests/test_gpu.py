"""The tiny pipeline on a CUDA card, once per backend (skipped without CUDA: CI has none).

Run on the lent GPU machine; results of the full-size runs are in benchmarks/results/.
"""

import json

import pytest
import torch
from conftest import tiny_config

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
