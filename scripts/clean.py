"""Rule clean: one raw shard -> clean shard, rejected shard (with reasons), stats."""

from kiln.clean import clean_shard
from kiln.smk import setup_log
from kiln.spec import CleanSettings

sm = snakemake  # noqa: F821 (injected by Snakemake)
log = setup_log(sm)
stats = clean_shard(
    sm.input.raw, sm.output.clean, sm.output.rejected, sm.output.stats, CleanSettings.coerce(sm.params.settings)
)
log.info(
    "clean %s: %s kept, %s rejected %s",
    sm.input.raw,
    stats["rows_clean"],
    stats["rows_rejected"],
    stats["rejected_by_reason"],
)
