"""Rule collect: one shard of one source -> canonical raw Parquet."""

from kiln.experiment import SourceSpec
from kiln.smk import setup_log
from kiln.sources import collect_shard

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
source = SourceSpec.from_config(sm.params.source)  # typed at the door
collect_shard(source, sm.wildcards.shard, sm.output.raw, dataset=sm.wildcards.dataset, kinds=sm.params.kinds)
