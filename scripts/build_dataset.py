"""Rule build_dataset: clean shards -> dedup -> split -> DatasetDict."""

from kiln.dataset import build_dataset
from kiln.smk import setup_log
from kiln.spec import BuildSettings

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
build_dataset(
    list(sm.input.shards),
    sm.output.dataset,
    sm.output.rejected,
    sm.output.stats,
    BuildSettings.coerce(sm.params.settings),
    mixture=dict(sm.params.mixture),
    data_dir=sm.params.data_dir,
)
