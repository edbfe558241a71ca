# Kiln: raw data -> cleaned Arrow dataset -> tokens -> 4-bit QLoRA -> merged model -> evaluation.
#   snakemake --cores 1            every experiment in config/config.yaml
#   snakemake --cores 1 -n         what would run, and why
import os
import sys

from snakemake.utils import min_version

min_version("9.0")


# The embedded default, found next to this file whatever the working directory. With a
# --configfile, rules/common.smk extends it the Kiln way (experiments replaced, datasets and models
# merged by name), so Snakemake does not load it here nor announce it "is extended".
if not workflow.config_settings.configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "rules/common.smk"


wildcard_constraints:
    dataset=_names("datasets"),
    model=_names("models"),
    experiment=_names("experiments"),
    source="[A-Za-z0-9][A-Za-z0-9_.-]*",
    shard="[^/]+",
    tok="[^/]+",
    qtype="[A-Za-z0-9_]+",


include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/export.smk"
include: "rules/audit.smk"


# A finished run ends with each experiment's main metric, base -> tuned, and where things are.
onsuccess:
    print(finished_run_summary(), file=sys.stderr)


# `snakemake --report results/report.html`: this text opens the report; captions in report/.
report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        all_targets(),
