"""Rule export_gguf: merged model -> GGUF of one type, verified against it in llama.cpp."""

from kiln.export import export_gguf
from kiln.smk import setup_log, use_cores
from kiln.spec import EvaluateSettings, ExportSettings

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
use_cores(sm)
export_gguf(
    sm.input.merged,
    sm.input.dataset,
    sm.output.gguf,
    sm.output.report,
    sm.wildcards.qtype,
    ExportSettings.coerce(sm.params.export),
    EvaluateSettings.coerce(sm.params.evaluate),
    sm.log[0],
)
