"""Load, validate and resolve the workflow configuration (no heavy imports: runs at parse time)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kiln.experiment import Experiment
from kiln.families import check_export, saved_chat_template
from kiln.preference import preference_problem
from kiln.shards import safe_name
from kiln.spec import BuildSettings, CleanSettings, ConfigError, SpecError, moved_key_error

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def _with_defaults(validator_class):
    """A jsonschema validator that also fills in each `default` it passes (the documented recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(prop, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft7Validator)


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def extend_default(default: dict, user: dict) -> dict:
    """A user's --configfile over the embedded default (issue 14): `datasets` and `models` are merged
    by name (the user's entries win whole; the default's, such as the embedded model, stay usable);
    `experiments`, when given, replace the default's, so only the user's are built, and an
    experiment's `base:` may name one of the default's (its settings, deep-merged with the user's
    keys; `default: {base: default}` keeps the default's own); every other key is the user's where
    given, else the default's."""
    out = copy.deepcopy(default)
    for key, value in user.items():
        if key in ("datasets", "models") and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        elif key == "experiments" and isinstance(value, dict):
            theirs = default.get("experiments") or {}
            out[key] = {}
            for name, exp in value.items():
                base = exp.get("base") if isinstance(exp, dict) else None
                # `name: {base: name}` is the default's experiment of that name (kept, or tuned)
                if base and base in theirs and (base not in value or base == name):
                    exp = _deep_merge(theirs[base], {k: v for k, v in exp.items() if k != "base"})
                out[key][name] = copy.deepcopy(exp)
            if "sweeps" not in user:
                out.pop("sweeps", None)  # the default's sweeps are over the default's experiments
        else:
            out[key] = copy.deepcopy(value)
    return out


def _value_name(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return safe_name(text).strip("_") or "x"


def expand_experiments(config: dict) -> dict:
    """Resolve `base:` inheritance between experiments and expand `sweeps:` into named experiments.

    An experiment with ``base: other`` is ``other`` deep-merged with its own keys. A sweep
    ``{base: exp, grid: {"training.learning_rate": [1e-4, 3e-4], "training.lora_r": [8, 16]}}``
    named ``lr`` becomes one experiment per combination, named ``lr-learning_rate0.0001-lora_r8``
    and so on: ordinary experiments from then on (their own outputs; shared data stages).
    """
    cfg = copy.deepcopy(config)
    raw = cfg.get("experiments")
    if not isinstance(raw, dict):
        return cfg
    done: dict[str, dict] = {}

    def resolve(name: str, chain: tuple[str, ...], where: str) -> dict:
        if name in done:
            return done[name]
        if name not in raw:
            raise ConfigError(f"config: {where}: '{name}' is not in `experiments` (known: {', '.join(sorted(raw))})")
        if name in chain:
            raise ConfigError(f"config: experiments.{name}.base: inheritance loops ({' -> '.join(chain + (name,))})")
        exp = raw[name]
        if isinstance(exp, dict) and "base" in exp:
            own = {k: v for k, v in exp.items() if k != "base"}
            exp = _deep_merge(resolve(exp["base"], chain + (name,), f"experiments.{name}.base"), own)
        done[name] = exp
        return exp

    for name in raw:
        resolve(name, (), "experiments")
    sweeps = cfg.get("sweeps") or {}
    if not isinstance(sweeps, dict):
        raise ConfigError("config: sweeps: expected a map of sweep name -> {base, grid}")
    for sweep, spec in sweeps.items():
        where = f"sweeps.{sweep}"
        if not isinstance(spec, dict) or set(spec) - {"base", "grid"} or "base" not in spec or "grid" not in spec:
            raise ConfigError(f"config: {where}: expected {{base: <experiment>, grid: {{setting: [values]}}}}")
        base = resolve(spec["base"], (), f"{where}.base")
        grid = spec["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"config: {where}.grid: expected a map of setting -> list of values")
        for key, values in grid.items():
            if not re.fullmatch(r"(dataset|model|(tokenize|training|merge|evaluate)\.[a-z_0-9]+)", str(key)):
                raise ConfigError(
                    f"config: {where}.grid.{key}: name a setting as dataset, model, or "
                    "tokenize.<key> / training.<key> / merge.<key> / evaluate.<key>"
                )
            if not isinstance(values, list) or not values:
                raise ConfigError(f"config: {where}.grid.{key}: expected a non-empty list of values")
        for combo in itertools.product(*grid.values()):
            exp = copy.deepcopy(base)
            parts = [sweep]
            for key, value in zip(grid, combo):
                section, _, leaf = key.partition(".")
                if leaf:
                    exp.setdefault(section, {})[leaf] = value
                else:
                    exp[section] = value
                parts.append(f"{leaf or section}{_value_name(value)}")
            name = "-".join(parts)
            if name in done:
                raise ConfigError(f"config: {where}: makes experiment '{name}', which already exists")
            done[name] = exp
    cfg["experiments"] = done
    return cfg


REGRESSION_PREFIX = "regression-"


def regression_file_datasets(config: dict) -> dict:
    """An `evaluate.regression` entry that names no dataset is a file glob: it becomes a dataset of
    one local source, named regression-<short hash of the glob>, before validation fills its
    defaults (whole files are scored: no split is held out of it)."""
    datasets = config.get("datasets") or {}
    for exp in (config.get("experiments") or {}).values():
        if not isinstance(exp, dict):
            continue
        entries = (exp.get("evaluate") or {}).get("regression") or []
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if isinstance(entry, str) and entry not in datasets:
                datasets = {
                    **datasets,
                    regression_dataset_name(entry): {
                        "sources": [{"name": "file", "kind": "local", "path": entry}],
                        "build": {"validation": 0.0, "test": 0.0},
                    },
                }
    return {**config, "datasets": datasets} if datasets else config


def regression_dataset_name(entry: str) -> str:
    return f"{REGRESSION_PREFIX}{short_hash(entry)}"


def regression_datasets(cfg: dict, experiment: str) -> list[str]:
    """The dataset names of an experiment's regression sets, in its order."""
    return [
        e if e in cfg["datasets"] else regression_dataset_name(e)
        for e in cfg["experiments"][experiment]["evaluate"]["regression"]
    ]


def validate(config: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Return a copy of ``config`` with defaults filled in; raise ConfigError naming the key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    resolved = regression_file_datasets(expand_experiments(config))
    for name, exp in (resolved.get("experiments") or {}).items():
        moved = moved_key_error(name, exp) if isinstance(exp, dict) else None
        if moved:
            raise ConfigError(moved)
    errors = sorted(_Validator(schema).iter_errors(resolved), key=lambda e: len(list(e.absolute_path)))
    if errors:
        # The deepest error of the best match names the key the user got wrong.
        err = jsonschema.exceptions.best_match(errors)
        while err.context:
            err = jsonschema.exceptions.best_match(err.context)
        raise ConfigError(f"config: {_path(err)}: {err.message}")
    _check_references(resolved)
    return resolved


def _check_references(cfg: dict) -> None:
    for name, ds in cfg["datasets"].items():
        seen = set()
        for i, src in enumerate(ds["sources"]):
            if src["name"] in seen:
                raise ConfigError(f"config: datasets.{name}.sources[{i}].name: '{src['name']}' is used twice")
            seen.add(src["name"])
            if src["kind"] == "hf":
                _check_pinned(src, f"datasets.{name}.sources[{i}]")
            if src["kind"] == "url" and src["sha256"] and len(src["sha256"]) != len(src["urls"]):
                raise ConfigError(
                    f"config: datasets.{name}.sources[{i}].sha256: give one entry per url "
                    f"({len(src['urls'])} urls, {len(src['sha256'])} hashes); null skips a check"
                )
            if src["kind"] == "url" and not src["allow_unverified"]:
                hashes = src["sha256"] or [None] * len(src["urls"])
                missing = [u for u, h in zip(src["urls"], hashes) if not h]
                if missing:
                    raise ConfigError(
                        f"config: datasets.{name}.sources[{i}].sha256: no hash for {missing[0]}; a download is "
                        f"checked against its sha256 (`kiln url-hash {missing[0]}` prints it), or set "
                        "allow_unverified: true to accept unverified bytes"
                    )
        try:  # the typed settings of each data stage (kiln.spec)
            CleanSettings.from_dict(ds["clean"], f"datasets.{name}.clean").check(f"datasets.{name}.clean")
            BuildSettings.from_dict(ds["build"], f"datasets.{name}.build").check(f"datasets.{name}.build")
        except SpecError as exc:
            raise ConfigError(f"config: {exc}") from None
    for name, model in cfg["models"].items():
        if model["kind"] == "hub":
            _check_pinned(model, f"models.{name}")
        if model["kind"] != "random":
            continue
        ref = model["tokenizer_from"]
        if ref in cfg["models"]:
            if cfg["models"][ref]["kind"] == "random":
                raise ConfigError(f"config: models.{name}.tokenizer_from: must name a model with real weights")
        elif not os.path.isdir(ref):
            raise ConfigError(
                f"config: models.{name}.tokenizer_from: '{ref}' is neither a model in `models` "
                f"(known: {', '.join(sorted(cfg['models']))}) nor a folder with a saved tokenizer"
            )
    for name, exp in cfg["experiments"].items():
        for key, table in (("dataset", "datasets"), ("model", "models")):
            if exp[key] not in cfg[table]:
                raise ConfigError(
                    f"config: experiments.{name}.{key}: '{exp[key]}' is not in `{table}` "
                    f"(known: {', '.join(sorted(cfg[table]))})"
                )
        _check_family(cfg, name, exp)
        problem = preference_problem(cfg, name)
        if problem:
            raise ConfigError(f"config: experiments.{name}.{problem}")
        lm_eval = exp["evaluate"]["lm_eval"]
        if lm_eval["include_path"] and not os.path.isdir(lm_eval["include_path"]):
            raise ConfigError(
                f"config: experiments.{name}.evaluate.lm_eval.include_path: '{lm_eval['include_path']}' "
                "is not a folder (of task YAML files)"
            )
        if lm_eval["tasks"] and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(
                f"config: experiments.{name}.evaluate.lm_eval.tasks: lm-evaluation-harness is not installed "
                "(pip install -e '.[lm-eval]')"
            )
        for entry in exp["evaluate"]["regression"]:
            if entry == exp["dataset"]:
                raise ConfigError(
                    f"config: experiments.{name}.evaluate.regression: '{entry}' is the dataset the experiment "
                    "trains on; a regression set is other data (its own test split is scored anyway)"
                )
    resolve(cfg)  # the typed spec: every rule between settings (kiln.spec)


def _check_family(cfg: dict, name: str, exp: dict) -> None:
    """What needs the chat template's family (the Modelfile's TEMPLATE under export.ollama: true),
    checked now where the template can be read (a local model, a random one's tokenizer folder),
    rather than failing after training."""
    model = cfg["models"][exp["model"]]
    folder = model.get("path") if model["kind"] == "local" else model.get("tokenizer_from")
    if model["kind"] not in ("local", "random") or not folder or not os.path.isdir(folder):
        return
    problem = check_export(saved_chat_template(folder), exp["export"]["ollama"], exp["export"]["gguf"])
    if problem:
        raise ConfigError(f"config: experiments.{name}.export.ollama: {problem}")


def resolve(cfg: dict) -> dict[str, Experiment]:
    """The experiments of a validated config, resolved (kiln.experiment): what the rules read."""
    try:
        return {name: Experiment.from_config(name, cfg, regression_datasets(cfg, name)) for name in cfg["experiments"]}
    except SpecError as exc:
        raise ConfigError(f"config: {exc}") from None


COMMIT = re.compile(r"[0-9a-f]{40}")


def _check_pinned(spec: dict, where: str) -> None:
    """A Hub revision must be a commit hash: a branch or tag can point at other bytes tomorrow."""
    if spec.get("allow_unpinned") or COMMIT.fullmatch(str(spec["revision"])):
        return
    raise ConfigError(
        f"config: {where}.revision: {spec['revision']!r} is not a commit hash, so the same config could "
        "fetch other bytes later; pin the full 40-character commit (the Hub page's 'History' lists them), "
        "or set allow_unpinned: true to accept it (the manifest and model card will say so)"
    )


def training_settings(training: dict | None = None) -> dict:
    """A `training:` block with the schema's defaults filled in and checked, as an experiment gets
    it: for calling kiln.train.train outside the workflow (tests, benchmarks)."""
    cfg = {
        "datasets": {"d": {"sources": [{"name": "s", "kind": "synthetic"}]}},
        "models": {"m": {"kind": "local", "path": "."}},
        "experiments": {"e": {"dataset": "d", "model": "m", "training": training or {}}},
    }
    return validate(cfg)["experiments"]["e"]["training"]


def tokenizer_source(cfg: dict, model: str) -> str | None:
    """For a random-weights model: the model name or folder its tokenizer comes from."""
    spec = cfg["models"][model]
    return spec.get("tokenizer_from") if spec["kind"] == "random" else None


def short_hash(value: Any, n: int = 8) -> str:
    """A stable short hash of a JSON-able value (used to name cached variants)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def tokenization_key(cfg: dict, experiment: str) -> str:
    """Experiments with the same base model and tokenize settings share one tokenized dataset."""
    exp = cfg["experiments"][experiment]
    return f"{exp['model']}-{short_hash(exp['tokenize'])}"


def tokenization_settings(cfg: dict, dataset: str, key: str) -> dict:
    """The tokenize settings of an experiment that trains on `dataset`, or scores it as a regression
    set, with the base model and settings of `key`."""
    for name, exp in cfg["experiments"].items():
        uses = exp["dataset"] == dataset or dataset in regression_datasets(cfg, name)
        if uses and f"{exp['model']}-{short_hash(exp['tokenize'])}" == key:
            return exp["tokenize"]
    raise ConfigError(f"no experiment tokenizes dataset '{dataset}' as '{key}'")
