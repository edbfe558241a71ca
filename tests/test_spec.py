"""The typed spec and the schema describe the same settings; rules between settings fail at parse time."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kiln.config import ConfigError, resolve, validate
from kiln.experiment import Experiment
from kiln.spec import DATASET_SECTIONS, SECTIONS, TrainingSettings

SCHEMA = yaml.safe_load(Path(REPO / "config" / "schema.yaml").read_text())
DEFAULT = yaml.safe_load(Path(REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize(
    "owner, section", [("experiment", s) for s in sorted(SECTIONS)] + [("dataset", s) for s in sorted(DATASET_SECTIONS)]
)
def test_schema_and_dataclass_have_the_same_keys_defaults_and_choices(owner, section):
    props = SCHEMA["definitions"][owner]["properties"][section]["properties"]
    kind = {**SECTIONS, **DATASET_SECTIONS}[section]
    assert set(props) == set(kind.defaults()), section
    for name, default in kind.defaults().items():
        assert props[name]["default"] == default, f"{section}.{name}"
        choices = next((f.metadata.get("choices") for f in kind.__dataclass_fields__.values() if f.name == name), None)
        if "enum" in props[name] or choices:
            assert tuple(props[name].get("enum", ())) == tuple(choices or ()), f"{section}.{name}"
        assert kind.help()[name].strip(), f"{section}.{name} has no help text"


def test_the_default_config_resolves_to_a_typed_experiment():
    cfg = validate(DEFAULT)
    exp = resolve(cfg)["default"]
    assert isinstance(exp, Experiment) and exp.dataset.name == "orders" and exp.model.kind == "gguf_package"
    assert exp.training.learning_rate == cfg["experiments"]["default"]["training"]["learning_rate"]
    assert exp.merge.onto == "dequantized" and exp.evaluate.main_metric == "exact_match" and exp.evaluate.task == "auto"
    assert exp.training.to_dict() == cfg["experiments"]["default"]["training"]  # params stay plain data


def _with(**sections) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    for section, values in sections.items():
        cfg["experiments"]["default"].setdefault(section, {}).update(values)
    return cfg


def test_a_moved_merge_key_says_where_it_went():
    cfg = copy.deepcopy(DEFAULT)
    cfg["experiments"]["default"].pop("merge")
    cfg["experiments"]["default"]["evaluate"]["merge_onto"] = "dequantized"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == (
        "config: experiments.default.evaluate.merge_onto moved to experiments.default.merge.onto "
        "(same values); rename it there"
    )


def test_early_stopping_misalignment_fails_when_the_workflow_is_parsed():
    # It used to fail only inside the training job, after the model had loaded.
    cfg = _with(training={"early_stopping_patience": 2, "eval_steps": 4, "save_steps": 6})
    with pytest.raises(ConfigError, match="experiments.default.training.early_stopping_patience needs save_steps"):
        validate(cfg)
    validate(_with(training={"early_stopping_patience": 2, "eval_steps": 3, "save_steps": 6}))


def test_unknown_training_key_is_named():
    with pytest.raises(ValueError, match=r"training.lr: not a setting"):
        TrainingSettings.from_dict({"lr": 1e-4})


# ---- pins that are pins (issue 12, finding 5) ------------------------------------------------------
HUB_COMMIT = "7ae557604adf67be50417f59c2c2f167def9a775"


def _hub_model(**extra) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    cfg["models"]["qwen"] = {"kind": "hub", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct", **extra}
    return cfg


def _hf_source(**extra) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    cfg["datasets"]["orders"]["sources"].append({"name": "hub", "kind": "hf", "path": "org/data", **extra})
    return cfg


@pytest.mark.parametrize("revision", ["main", "v1.0", "7ae5576"])
def test_a_revision_that_is_not_a_commit_is_refused(revision):
    with pytest.raises(ConfigError, match=rf"^config: models.qwen.revision: '{revision}' is not a commit hash"):
        validate(_hub_model(revision=revision))
    with pytest.raises(ConfigError, match=r"^config: datasets.orders.sources\[1\].revision: .* allow_unpinned: true"):
        validate(_hf_source(revision=revision))


def test_a_commit_or_an_explicit_allow_unpinned_is_accepted_and_the_card_says_so():
    from kiln.manifest_record import DatasetRecord, ModelRecord, unpinned_inputs

    validate(_hub_model(revision=HUB_COMMIT))
    validate(_hf_source(revision=HUB_COMMIT))
    cfg = validate(_hub_model(revision="main", allow_unpinned=True))
    assert cfg["models"]["qwen"]["allow_unpinned"] is True
    dataset = validate(_hf_source(revision="main", allow_unpinned=True))["datasets"]["orders"]
    model = ModelRecord.from_dict({"name": "qwen", **cfg["models"]["qwen"]})
    lines = unpinned_inputs(model, DatasetRecord.from_dict({"name": "orders", **dataset}))
    assert lines[0] == "base model Qwen/Qwen2.5-0.5B-Instruct at revision 'main' (allow_unpinned)"
    assert lines[1] == "data source hub (org/data) at revision 'main' (allow_unpinned)"
