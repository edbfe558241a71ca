"""The resolved experiment (kiln.experiment) is what the rules read: its dataset and model specs and
typed settings. The params the rules hand Snakemake are made from it, and for a config written in the
schema's order (the embedded default) they are the config's own values, repr for repr: Snakemake
compares params by repr, so a run made before the types is not rerun for its params."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from conftest import REPO

from kiln.config import ConfigError, regression_datasets, resolve, validate
from kiln.experiment import ModelSpec, SourceSpec
from kiln.spec import DATASET_SECTIONS, SECTIONS

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())


def test_an_experiment_holds_its_dataset_and_model_specs():
    cfg = validate(DEFAULT)
    exp = resolve(cfg)["default"]
    assert exp.dataset.name == "orders" and exp.dataset.build.seed == cfg["datasets"]["orders"]["build"]["seed"]
    (source,) = exp.dataset.sources
    assert source.kind == "synthetic" and source.weight == 1.0 and source.max_rows is None
    assert exp.model.name == "smollm2-135m" and exp.model.kind == "gguf_package"
    assert exp.dataset.mixture() == {source.name: {"weight": 1.0, "max_rows": None}}


@pytest.mark.parametrize("owner, sections", [("experiment", SECTIONS), ("dataset", DATASET_SECTIONS)])
def test_each_settings_type_lists_its_keys_in_the_schemas_order(owner, sections):
    for name, kind in sections.items():
        assert list(kind.defaults()) == list(SCHEMA["definitions"][owner]["properties"][name]["properties"]), name


def test_the_rules_params_are_the_configs_own_values_repr_for_repr():
    """What each rule's params were before the types (the config's slices) against what they are now."""
    cfg = validate(DEFAULT)
    for name, exp in resolve(cfg).items():
        raw = cfg["experiments"][name]
        for section in SECTIONS:
            assert repr(getattr(exp, section).to_dict()) == repr(raw[section]), section
        ds, model = raw["dataset"], raw["model"]
        for section in DATASET_SECTIONS:
            assert repr(getattr(exp.dataset, section).to_dict()) == repr(cfg["datasets"][ds][section]), section
        before = {
            "name": name,
            "dataset": {"name": ds, **cfg["datasets"][ds]},
            "model": {"name": model, **cfg["models"][model]},
            "tokenize": raw["tokenize"],
            "training": raw["training"],
        }
        assert repr(exp.adapter_spec()) == repr(before)
        regression = [
            {"entry": e, "dataset": {"name": d, **cfg["datasets"][d]}}
            for e, d in zip(raw["evaluate"]["regression"], regression_datasets(cfg, name))
        ]
        stage = {"merge": raw["merge"], "export": raw["export"], "evaluate": raw["evaluate"]}
        assert repr(exp.stage_settings()) == repr({**stage, "regression_datasets": regression})


def test_regression_sets_resolve_to_their_datasets(tmp_path):
    (tmp_path / "general.txt").write_text("Some general text.\n")
    cfg = copy.deepcopy(DEFAULT)
    cfg["experiments"]["default"]["evaluate"]["regression"] = [str(tmp_path / "general.txt")]
    exp = resolve(validate(cfg))["default"]
    (extra,) = exp.regression
    assert extra.name.startswith("regression-") and extra.sources[0].path == str(tmp_path / "general.txt")
    assert exp.stage_settings()["regression_datasets"][0]["dataset"]["name"] == extra.name


def test_a_rule_between_settings_is_refused_when_resolving():
    cfg = validate(DEFAULT)
    cfg["experiments"]["default"]["training"].update(num_gpus=2, backend="unsloth")
    with pytest.raises(ConfigError, match=r"^config: experiments\.default\.training\.backend: 'unsloth'"):
        resolve(cfg)


def _schema_defaults(definition: str) -> dict:
    """Every key's default in a schema definition, its kinds' own keys included."""
    spec = SCHEMA["definitions"][definition]
    found = {k: v["default"] for k, v in spec["properties"].items() if isinstance(v, dict) and "default" in v}
    for branch in spec.get("allOf", []):
        props = branch["then"]["properties"]
        found |= {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}
    return found


@pytest.mark.parametrize("definition, kind", [("source", SourceSpec), ("model", ModelSpec)])
def test_source_and_model_specs_have_the_schemas_keys_and_defaults(definition, kind):
    """The specs restate the schema's defaults (for a source or model built outside the workflow):
    held to the schema here, key for key, so they cannot drift apart."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    for key, default in _schema_defaults(definition).items():
        assert key in fields, f"{definition}.{key} has no field in {kind.__name__}"
        f = fields[key]
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert value == default, f"{definition}.{key}: {value!r} in {kind.__name__}, {default!r} in the schema"
    spec = SCHEMA["definitions"][definition]
    keys = set(spec["properties"]) | {k for b in spec.get("allOf", []) for k in b["then"]["properties"]}
    assert keys <= set(fields), sorted(keys - set(fields))
