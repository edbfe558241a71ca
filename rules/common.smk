# Config validation and the small helpers the rule files use. Nothing heavy is imported here:
# parsing the workflow must stay fast.
import os
import re
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "scripts"))

from kiln.config import (  # noqa: E402
    ConfigError,
    dataset_shards,
    source_config,
    tokenization_key,
    tokenization_settings,
    local_files,
    validate,
)

try:
    config = validate(config)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

R = config["results"]


def _names(table):
    return "|".join(re.escape(name) for name in config[table])


wildcard_constraints:
    dataset=_names("datasets"),
    model=_names("models"),
    experiment=_names("experiments"),
    source="[A-Za-z0-9][A-Za-z0-9_.-]*",
    shard="[^/]+",
    tok="[^/]+",


def code(*modules):
    """The kiln modules a rule runs: an edit to one reruns the rule and what follows."""
    return [os.path.join(workflow.basedir, "scripts", "kiln", f"{m}.py") for m in modules]


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
    model = config["models"][wildcards.model]
    if model["kind"] == "random":
        return {"tokenizer": f"{R}/base/{model['tokenizer_from']}"}
    return {}


def tokenized_dir(experiment):
    exp = config["experiments"][experiment]
    return f"{R}/data/{exp['dataset']}/tokenized/{tokenization_key(config, experiment)}"


def experiment_outputs(experiment):
    return [f"{tokenized_dir(experiment)}.json"] + [
        f"{R}/data/{config['experiments'][experiment]['dataset']}/dataset_stats.json"
    ]


def all_targets():
    targets = []
    for name in config["experiments"]:
        targets += experiment_outputs(name)
    return targets
