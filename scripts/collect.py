"""Rule collect: one shard of one source -> canonical raw Parquet."""

from kiln.smk import setup_log
from kiln.sources import collect_shard

log = setup_log(snakemake)  # noqa: F821 (injected by Snakemake)
collect_shard(snakemake.params.source, snakemake.wildcards.shard, snakemake.output.raw,  # noqa: F821
              dataset=snakemake.wildcards.dataset)  # noqa: F821
