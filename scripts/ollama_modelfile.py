"""Rule ollama_modelfile: the Modelfile that runs the exported GGUF in Ollama."""

from kiln.export import write_modelfile
from kiln.smk import setup_log

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
write_modelfile(sm.input.gguf, sm.input.merged, sm.input.dataset, sm.output[0], sm.params.ollama)
