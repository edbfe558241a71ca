"""Rule tokenize: dataset x base-model tokenizer -> token ids and loss masks (Arrow)."""

from kiln.smk import setup_log
from kiln.spec import TokenizeSettings
from kiln.tokenize import tokenize_dataset

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
tokenize_dataset(
    sm.input.dataset,
    sm.input.base,
    sm.output.tokenized,
    sm.output.stats,
    TokenizeSettings.coerce(sm.params.settings),
    cache_dir=sm.params.cache,
)
