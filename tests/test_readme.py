"""README's configuration snippets are real configuration: each YAML block, laid over the embedded
default, passes the schema and the reference checks the workflow runs at parse time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kiln.config import validate

REPO = Path(__file__).resolve().parents[1]
# What README abbreviates, and the value the test puts in its place (nothing else is edited).
ABBREVIATIONS = {"[3b4c…]": "[" + "3b4c" * 16 + "]", "{...}": "{}"}


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_yaml_snippets():
    assert len(yaml_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(yaml_blocks())))
def test_each_readme_yaml_snippet_is_a_valid_config(index):
    text = yaml_blocks()[index]
    for short, full in ABBREVIATIONS.items():
        text = text.replace(short, full)
    snippet = yaml.safe_load(text)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in snippet.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    resolved = validate(config)
    for key, value in snippet.items():  # what the snippet says is what the workflow gets
        if isinstance(value, dict):
            assert set(value) <= set(resolved[key])
