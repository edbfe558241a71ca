"""Rule base_model: a configured model source -> safetensors + tokenizer + identity.json."""

from kiln.base_model import prepare_base_model
from kiln.smk import setup_log, use_cores

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
use_cores(sm)
prepare_base_model(sm.params.model, sm.wildcards.model, sm.output.model, tokenizer_dir=sm.input.get("tokenizer"))
