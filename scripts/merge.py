"""Rule merge: adapter + base -> merged safetensors model, with a logits check report."""

from kiln.merge import merge_adapter
from kiln.smk import setup_log, use_cores
from kiln.spec import MergeSettings

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
use_cores(sm)
merge_adapter(
    sm.input.adapter,
    sm.output.merged,
    sm.output.report,
    sm.input.dataset,
    MergeSettings.coerce(sm.params.settings),
    log_path=sm.log[0],
)
