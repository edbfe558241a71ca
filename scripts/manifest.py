"""Rule manifest: every input of one experiment -> manifest.json, and its HTML views for the report."""

import json

from kiln.manifest import build_manifest, write_manifest
from kiln.pages import manifest_page, samples_page
from kiln.smk import setup_log

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
experiment = sm.wildcards.experiment
manifest = build_manifest(
    experiment,
    dict(sm.params.settings),
    sm.input.dataset_stats,
    sm.input.tokenize_stats,
    sm.input.base,
    sm.input.adapter,
    sm.input.merged,
    sm.input.metrics,
    sm.input.summary,
    sm.input.merge_report,
    benchmarks=dict(sm.params.benchmarks),
    code=dict(sm.params.code_version),
    packages=dict(sm.params.packages),
    shard_stats=list(sm.input.shard_stats),
    samples=sm.input.samples,
    gguf_reports=list(sm.input.gguf_reports),
)
write_manifest(sm.output.manifest, json.loads(json.dumps(manifest)))
with open(sm.output.html, "w") as f:
    f.write(manifest_page(manifest))
with open(sm.output.samples_html, "w") as f:
    f.write(samples_page(sm.input.samples, experiment, task=manifest["metrics"].get("task", "")))
