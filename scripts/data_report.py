"""Rule data_report: stage statistics of one dataset -> an HTML page and a token-length histogram."""

from kiln.pages import data_stats, data_stats_page, plot_token_lengths
from kiln.smk import setup_log

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
stats = data_stats(list(sm.input.shard_stats), sm.input.dataset_stats, list(sm.input.tokenize_stats))
with open(sm.output.html, "w") as f:
    f.write(data_stats_page(stats, sm.wildcards.dataset))
plot_token_lengths(list(sm.input.tokenize_stats), sm.output.lengths)
