"""clean.query is a filter, never code: the attack payloads are refused before anything runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from conftest import REPO

from kiln.clean import CleanError, clean_table
from kiln.config import ConfigError, validate
from kiln.repro import reproduce
from kiln.rowfilter import FilterError, parse_filter
from kiln.spec import CleanSettings
from kiln.tables import RAW_SCHEMA

COLUMNS = ("n_chars", "n_turns", "kind", "source")
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def payloads(marker: Path) -> list[str]:
    cmd = f"touch {marker}"
    return [
        f"@pd.io.common.os.system('{cmd}')",  # the reported one: pandas resolves @ against module globals
        f"n_chars > 0 and @pd.io.common.os.system('{cmd}') == 0",
        f"__import__('os').system('{cmd}') == 0",
        "n_chars.__class__.__mro__ == 1",
        f"open('{marker}', 'w')",
        "kind == (lambda: 1)()",
        "[c for c in kind]",
        "n_chars @ n_turns",
        "exec('1') == None",
    ]


def test_attack_payloads_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for text in payloads(marker):
        with pytest.raises(FilterError):
            parse_filter(text, COLUMNS)
    assert not marker.exists()


def test_filters_people_write_still_work():
    frame = {
        "n_chars": np.array([3, 10, 50]),
        "n_turns": np.array([2, 2, 4]),
        "kind": np.array(["chat", "text", "chat"], dtype=object),
        "source": np.array(["mail", "docs-web", "forum"], dtype=object),
    }
    cases = {
        "n_chars > 4": [False, True, True],
        'n_turns <= 2 and kind == "chat"': [True, False, False],
        '(n_chars > 4) & ~(source == "forum")': [False, True, False],
        'source in ["mail", "forum"]': [True, False, True],
        'source not in ["mail"]': [False, True, True],
        'contains(source, "docs") or n_chars < 4': [True, True, False],
        "3 < n_chars < 40": [False, True, False],
        'not kind == "text"': [True, False, True],
        'startswith(source, "docs") | endswith(source, "um")': [False, True, True],
        'matches(source, "^m.il$")': [True, False, False],
    }
    for text, want in cases.items():
        assert parse_filter(text, COLUMNS)(frame).tolist() == want, text


def _raw(n: int = 3) -> pa.Table:
    rows = [
        {
            "kiln_id": f"id{i}",
            "source": "s",
            "file": "f",
            "row": i + 1,
            "format": "messages",
            "kind": "chat",
            "messages": [{"role": "user", "content": "q" * (i + 3)}, {"role": "assistant", "content": "an answer"}],
            "raw": None,
            "error": None,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def test_the_clean_stage_refuses_a_payload_with_a_clear_message(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(CleanError, match=r"clean.query: .*does not parse.*'@' variables are not supported"):
        clean_table(_raw(), CleanSettings(query=payloads(marker)[0]))
    assert not marker.exists()
    clean, rejected, _ = clean_table(_raw(), CleanSettings(query="n_chars > 12"))  # 12, 13, 14 chars
    assert clean.num_rows == 2 and rejected.column("reason").to_pylist() == ["query"]


def test_a_payload_in_the_config_fails_when_the_workflow_is_parsed(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["datasets"]["orders"]["clean"]["query"] = payloads(tmp_path / "pwned")[2]
    with pytest.raises(ConfigError, match=r"^config: datasets.orders.clean.query: .*may be called"):
        validate(cfg)


def test_repro_refuses_a_manifest_whose_config_would_be_code(tiny_run, tmp_path):
    """A manifest someone sends you: a query payload, or YTE templating (Snakemake would run it)."""
    base = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    marker = tmp_path / "pwned"
    bad_query = copy.deepcopy(base)
    bad_query["config"]["dataset"].setdefault("clean", {})["query"] = payloads(marker)[0]
    yte = copy.deepcopy(base)
    yte["config"]["dataset"].setdefault("clean", {})["__use_yte__"] = True
    yte["config"]["experiment"]["training"]["?if True"] = {"seed": f"?__import__('os').system('touch {marker}')"}
    for i, (manifest, why) in enumerate(((bad_query, "clean.query"), (yte, "templating at manifest.config"))):
        path = tmp_path / f"m{i}.json"
        path.write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="refused") as err:
            reproduce(path, tmp_path / f"w{i}", train=False)
        assert why in str(err.value), err.value
        assert not (tmp_path / f"w{i}" / "results").exists() and not marker.exists()
