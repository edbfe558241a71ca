"""Rule evaluate: base vs tuned (merged) vs adapter-on-4-bit on the test split."""

from kiln.evaluate import evaluate
from kiln.smk import setup_log, use_cores

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
use_cores(sm)
evaluate(
    sm.input.dataset,
    sm.input.tokenized,
    sm.input.base,
    sm.input.merged,
    sm.input.adapter,
    sm.output.metrics,
    sm.output.samples,
    sm.params.settings,
    experiment=sm.wildcards.experiment,
    # config entry (a dataset name or a file glob) -> its tokenized dataset
    regression=dict(zip(sm.params.regression, sm.input.regression, strict=True)),
    # GGUF type -> file (each verified by export_gguf): scored in llama.cpp on the same rows
    gguf={p.rsplit("model-", 1)[1].removesuffix(".gguf"): p for p in sm.input.gguf},
)
