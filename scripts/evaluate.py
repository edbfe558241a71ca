"""Rule evaluate: base vs tuned (merged) vs adapter-on-4-bit on the test split."""

from kiln.evaluate import EvaluationInputs, evaluate
from kiln.smk import setup_log, use_cores
from kiln.spec import EvaluateSettings

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
use_cores(sm)
inputs = EvaluationInputs(
    dataset=sm.input.dataset,
    tokenized=sm.input.tokenized,
    base=sm.input.base,
    merged=sm.input.merged,
    adapter=sm.input.adapter,
    # config entry (a dataset name or a file glob) -> its tokenized dataset
    regression=dict(zip(sm.params.regression, sm.input.regression, strict=True)),
    # GGUF type -> file (each verified by export_gguf): scored in llama.cpp on the same rows
    gguf={p.rsplit("model-", 1)[1].removesuffix(".gguf"): p for p in sm.input.gguf},
    # method dpo: the held-out pairs, and the SFT model and metrics it is compared with
    pairs=sm.input.get("pairs", ""),
    sft_merged=sm.input.get("sft_merged", ""),
    sft_metrics=sm.input.get("sft_metrics", ""),
    sft_settings=sm.params.sft_settings,
)
evaluate(
    inputs,
    sm.output.metrics,
    sm.output.samples,
    EvaluateSettings.coerce(sm.params.settings),
    experiment=sm.wildcards.experiment,
)
