"""Rule base_model: a configured model source -> safetensors + tokenizer + identity.json."""

from kiln.base_model import prepare_base_model
from kiln.experiment import ModelSpec
from kiln.smk import setup_log, use_cores

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
use_cores(sm)
spec = ModelSpec.from_config(sm.wildcards.model, sm.params.model)  # typed at the door
prepare_base_model(spec, sm.output.model, tokenizer_dir=sm.input.get("tokenizer"))
