"""Rule publish: merged model + manifest -> the shippable folder with its model card (README.md)."""

from kiln.card import publish
from kiln.smk import setup_log

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
publish(sm.input.merged, sm.input.manifest, sm.output.model)
