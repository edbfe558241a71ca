# Config validation and the small helpers of the workflow. Nothing heavy is imported here:
# parsing the workflow must stay fast.
import os
import re
import sys

# Appended, not prepended: scripts/ holds rule entry points (tokenize.py) named like stdlib modules.
sys.path.append(os.path.join(workflow.basedir, "scripts"))

from kiln.config import (  # noqa: E402
    ConfigError,
    dataset_shards,
    source_config,
    tokenization_key,
    tokenization_settings,
    tokenizer_source,
    local_files,
    validate,
)

# A --configfile is a whole Kiln config: it replaces the embedded default rather than being
# deep-merged into it (which would add the default's datasets and experiments to the user's).
if workflow.config_settings.configfiles:
    config.clear()
    config.update(workflow.config_settings.overwrite_config)
try:
    resolved = validate(config)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.clear()
config.update(resolved)

R = config["results"]


def _names(table):
    return "|".join(re.escape(name) for name in config[table])


def code(*modules):
    """The kiln modules behind a step; editing one reruns that step and what follows."""
    return [
        os.path.join(workflow.basedir, "scripts", "kiln", f"{m}.py") for m in modules
    ]


def shards(dataset):
    try:
        return dataset_shards(config, dataset)
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


def collect_input(wildcards):
    src = source_config(config, wildcards.dataset, wildcards.source)
    if src["kind"] == "local":
        return local_files(src["path"])[wildcards.shard]
    return []


def clean_shards(wildcards):
    return [
        f"{R}/data/{wildcards.dataset}/clean/{source}/{shard}.parquet"
        for source, shard in shards(wildcards.dataset)
    ]


def base_model_inputs(wildcards):
    source = tokenizer_source(config, wildcards.model)
    if source is None:
        return {}
    if source in config["models"]:
        return {"tokenizer": f"{R}/base/{source}"}
    return {"tokenizer": source}


def tokenized_dir(experiment):
    exp = config["experiments"][experiment]
    return f"{R}/data/{exp['dataset']}/tokenized/{tokenization_key(config, experiment)}"


def experiment_outputs(experiment):
    return [
        f"{R}/{experiment}/metrics.json",
        f"{R}/{experiment}/merge_report.json",
        f"{R}/{experiment}/loss.png",
    ]


def all_targets():
    targets = []
    for name in config["experiments"]:
        targets += experiment_outputs(name)
    return targets
