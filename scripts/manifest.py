"""Rule manifest: every input of one experiment -> manifest.json, and its HTML views for the report."""

import json

from kiln.manifest import ManifestInputs, build_manifest, write_manifest
from kiln.manifest_record import Manifest
from kiln.pages import manifest_page, samples_page
from kiln.smk import setup_log

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm)
experiment = sm.wildcards.experiment
manifest = build_manifest(
    experiment,
    dict(sm.params.settings),
    ManifestInputs.from_rule(sm.input),
    benchmarks=dict(sm.params.benchmarks),
    code=dict(sm.params.code_version),
    packages=dict(sm.params.packages),
)
write_manifest(sm.output.manifest, json.loads(json.dumps(manifest)))
record = Manifest.read(sm.output.manifest)  # the pages read what was written, as a type
with open(sm.output.html, "w") as f:
    f.write(manifest_page(record))
with open(sm.output.samples_html, "w") as f:
    f.write(samples_page(sm.input.samples, experiment, task=record.metrics.task))
