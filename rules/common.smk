# Config validation and the small helpers of the workflow. Nothing heavy is imported here:
# parsing the workflow must stay fast.
import os
import re
import sys

# The kiln package (scripts/kiln); no entry point in scripts/ is named like a stdlib module.
sys.path.append(os.path.join(workflow.basedir, "scripts"))

from kiln.codedeps import code_files  # noqa: E402
from kiln.experiment import DatasetSpec, ModelSpec  # noqa: E402
from kiln.layout import Layout  # noqa: E402
from kiln.locks import release_stale_lock  # noqa: E402
from kiln.config import (  # noqa: E402
    ConfigError,
    extend_default,
    tokenization_key,
    tokenization_settings,
    tokenizer_source,
    regression_datasets,
    resolve,
    validate,
)
from kiln.preference import expected_kinds, task_experiment  # noqa: E402
from kiln.shards import (  # noqa: E402
    check_local_paths,
    dataset_shards,
    local_files,
)

# A --configfile extends the embedded default the Kiln way (kiln.config.extend_default): datasets
# and models merged by name, experiments replaced (only the user's are built, `base:` may name a
# default one), other keys the user's where given. Snakemake's own deep merge would add the
# default's experiments to the user's.
if workflow.config_settings.configfiles:
    import yaml

    with open(os.path.join(workflow.basedir, "config", "config.yaml")) as _fh:
        _default = yaml.safe_load(_fh)
    _user = dict(workflow.config_settings.overwrite_config)
    config.clear()
    config.update(extend_default(_default, _user))
# A run killed by SIGKILL or a power cut leaves Snakemake's lock behind; the next plain run
# removes it when no Snakemake process works in this folder (never a live run's).
_stale = release_stale_lock(os.getcwd())
if _stale:
    print(_stale, file=sys.stderr)

try:
    resolved = validate(config)
    check_local_paths(resolved)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.clear()
config.update(resolved)

# Where each output lies (kiln.layout): the rules build their paths from it.
L = Layout(config["results"])
# Each experiment resolved (kiln.experiment): its dataset and model specs, its typed settings.
EXPERIMENTS = resolve(config)
DATASETS = {
    name: DatasetSpec.from_config(name, d) for name, d in config["datasets"].items()
}
MODELS = {name: ModelSpec.from_config(name, m) for name, m in config["models"].items()}


def _names(table):
    return "|".join(re.escape(name) for name in config[table])


def code(script):
    """A rule's entry script and every kiln module it runs (derived from its imports): editing any
    of them reruns that rule and what follows."""
    scripts = os.path.join(workflow.basedir, "scripts")
    return code_files(
        os.path.join(scripts, f"{script}.py"), os.path.join(scripts, "kiln")
    )


def shards(dataset):
    try:
        return dataset_shards(DATASETS[dataset])
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


def collect_input(wildcards):
    src = DATASETS[wildcards.dataset].source(wildcards.source)
    if src.kind == "local":
        return local_files(src.path)[wildcards.shard]
    return []


def clean_shards(wildcards):
    return [
        L.shard(wildcards.dataset, "clean", source, shard)
        for source, shard in shards(wildcards.dataset)
    ]


def mixture(wildcards):
    """Each source's `weight` and `max_rows` (only these: other source settings do not rebuild)."""
    return DATASETS[wildcards.dataset].mixture()


def base_model_inputs(wildcards):
    source = tokenizer_source(config, wildcards.model)
    if source is None:
        return {}
    if source in MODELS:
        return {"tokenizer": L.base(source)}
    return {"tokenizer": source}


def gpus(experiment, single=False):
    """GPUs a job of an experiment asks a cluster for: training all of num_gpus, merge/evaluate one."""
    n = EXPERIMENTS[experiment].training.num_gpus
    return min(n, 1) if single else n


def tokenized_dir(experiment):
    return L.tokenized(dataset_of(experiment), tokenization_key(config, experiment))


def task_tokenized_dir(experiment):
    return tokenized_dir(task_of(experiment))


def regression_dirs(wildcards):
    """The tokenized regression sets of an experiment (its model and tokenize settings)."""
    key = tokenization_key(config, wildcards.experiment)
    return [
        L.tokenized(name, key)
        for name in regression_datasets(config, wildcards.experiment)
    ]


def lm_eval_task_files(wildcards):
    """The YAML files of evaluate.lm_eval.include_path: editing a task reruns evaluation."""
    folder = EXPERIMENTS[wildcards.experiment].evaluate.lm_eval["include_path"]
    if not folder:
        return []
    return sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(folder)
        for f in files
        if f.endswith((".yaml", ".yml", ".py", ".jsonl", ".json"))
    )


def gguf_files(experiment):
    """The experiment's GGUF exports (export.gguf), in the configured order; [] when off."""
    return [L.gguf(experiment, q) for q in EXPERIMENTS[experiment].export.gguf]


def gguf_reports(experiment):
    """Each GGUF export's verification report, in the same order."""
    return [L.gguf_report(experiment, q) for q in EXPERIMENTS[experiment].export.gguf]


def export_prompt_settings(experiment):
    """The evaluate settings that choose the prompts evaluation generates from."""
    s = EXPERIMENTS[experiment].evaluate
    return {"max_samples": s.max_samples, "continuations": s.continuations}


def gguf_inputs(wildcards):
    """Evaluate's GGUF inputs: each file and its verification report."""
    return {
        "gguf": gguf_files(wildcards.experiment),
        "gguf_reports": gguf_reports(wildcards.experiment),
    }


def experiment_outputs(experiment):
    modelfile = (
        gguf_files(experiment) and EXPERIMENTS[experiment].export.ollama is not False
    )
    return [
        L.metrics(experiment),
        L.experiment(experiment, "merge_report.json"),
        L.experiment(experiment, "loss.png"),
        *([L.experiment(experiment, "gguf/Modelfile")] if modelfile else []),
    ]


def quiet_script_rules():
    """Snakemake 9 logs `Shell command: None` after every job of a script-based step, which has
    no shell command: noise after every job of this workflow. A filter on Snakemake's logger drops
    exactly those records; real shell commands still print."""
    import logging

    from snakemake_interface_logger_plugins.common import LogEvent

    class NoEmptyShellCommand(logging.Filter):
        def filter(self, record):
            return not (
                getattr(record, "event", None) == LogEvent.SHELLCMD
                and getattr(record, "shellcmd", 1) is None
            )

    logging.getLogger("snakemake.logging").addFilter(NoEmptyShellCommand())


quiet_script_rules()


def finished_run_summary():
    """kiln.metrics.run_summary over the experiments whose metrics exist."""
    import json

    from kiln.metrics import run_summary

    found, notes = {}, {}
    for name in EXPERIMENTS:
        path = L.metrics(name)
        if os.path.exists(path):
            with open(path) as fh:
                found[name] = json.load(fh)
        # what the export found to say (the first GGUF's verify report)
        reports = [p for p in gguf_reports(name) if os.path.exists(p)]
        if reports:
            with open(reports[0]) as fh:
                notes[name] = (json.load(fh).get("ollama") or {}).get("note")
    return run_summary(found, L.root, notes)


def all_targets():
    targets = []
    for name in EXPERIMENTS:
        targets += experiment_outputs(name)
    return targets + report_targets()


# ---- audit: manifests, comparison, report ------------------------------------------------------
from kiln.provenance import code_version, package_versions  # noqa: E402

# Parameters of the manifest: a new commit, a dirty tree or another package version reruns it.
CODE_VERSION = code_version(workflow.basedir)
PACKAGES = package_versions()


def dataset_of(experiment):
    return EXPERIMENTS[experiment].dataset.name


def task_of(experiment):
    """The SFT experiment whose task the model is scored on (itself, unless a preference one)."""
    return task_experiment(config, experiment)


def task_dataset_of(experiment):
    """The dataset of answers merge, export and evaluate use (a dpo run's: its SFT experiment's)."""
    return dataset_of(task_of(experiment))


def sft_inputs(wildcards):
    """A preference run's SFT experiment: its adapter (train starts from it and it is the reference)."""
    if task_of(wildcards.experiment) == wildcards.experiment:
        return {}
    return {"sft_adapter": L.adapter(task_of(wildcards.experiment))}


def preference_eval_inputs(wildcards):
    """A preference run's held-out pairs, and the SFT model and metrics it is compared with."""
    sft = task_of(wildcards.experiment)
    if sft == wildcards.experiment:
        return {}
    return {
        "pairs": tokenized_dir(wildcards.experiment),
        "sft_merged": L.merged(sft),
        "sft_metrics": L.metrics(sft),
    }


def model_of(experiment):
    return EXPERIMENTS[experiment].model.name


def tokenize_stats_of(experiment):
    return tokenized_dir(experiment) + ".json"


def stage_benchmarks(wildcards):
    """Snakemake benchmark records of every job behind an experiment, by stage."""
    exp = EXPERIMENTS[wildcards.experiment]
    name, ds, tok = exp.name, exp.dataset.name, tokenized_dir(exp.name)
    parts, b = shards(ds), L.benchmark
    return {
        "collect": [b("collect", f"{ds}/{s}/{sh}") for s, sh in parts],
        "clean": [b("clean", f"{ds}/{s}/{sh}") for s, sh in parts],
        "build_dataset": [b("build_dataset", ds)],
        "tokenize": [b("tokenize", f"{ds}/{os.path.basename(tok)}")],
        "base_model": [b("base_model", exp.model.name)],
        "train": [b("train", name)],
        "merge": [b("merge", name)],
        "export_gguf": [b("export_gguf", f"{name}-{q}") for q in exp.export.gguf],
        "evaluate": [b("evaluate", name)],
    }


def dataset_tokenize_stats(wildcards):
    """Stats of every tokenization of a dataset that some experiment uses."""
    return sorted(
        {
            tokenize_stats_of(name)
            for name, exp in EXPERIMENTS.items()
            if exp.dataset.name == wildcards.dataset
        }
    )


def shard_stats(wildcards):
    return shard_stats_of_dataset(wildcards.dataset)


def shard_stats_of_dataset(dataset):
    return [
        L.shard(dataset, "stats", source, shard, "json")
        for source, shard in shards(dataset)
    ]


def report_targets():
    """Everything the report shows (also built by the default target)."""
    files = [
        "experiments.csv",
        "experiments.md",
        "plots/loss_curves.png",
        "plots/main_metric.png",
    ]
    targets = [L.run_file(f) for f in files]
    for name in EXPERIMENTS:
        targets += [L.manifest(name), L.experiment(name, "model")]
    for ds in sorted({exp.dataset.name for exp in EXPERIMENTS.values()}):
        targets += [L.data_report(ds, "data_stats.html")]
    return targets
