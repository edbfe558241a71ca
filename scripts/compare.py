"""Rule compare: every experiment's manifest and step log -> comparison tables and plots."""

from kiln.compare import write_comparison
from kiln.smk import setup_log

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
write_comparison(
    list(sm.input.manifests),
    dict(zip(sm.params.experiments, sm.input.logs)),
    sm.output.csv,
    sm.output.md,
    sm.output.html,
    sm.output.loss,
    sm.output.metric,
)
