"""Hostile data and a leaky environment: every generated page escapes what it shows, and no secret
from the environment lands in results/ or the workflow's logs."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

import pytest
from conftest import Workflow, tiny_config

SCRIPT = "<script>alert('kiln')</script>"
ATTRIBUTE = "\"><img src=x onerror=alert('kiln')>"
SECRETS = {
    "HF_TOKEN": "hf_KilnFakeToken0123456789abcdefABCDEF",
    "HUGGING_FACE_HUB_TOKEN": "hf_KilnFakeHubToken9876543210zyxwv",
    "OPENAI_API_KEY": "sk-kilnfake-0123456789abcdefghijklmnopqrstuv",
    "WANDB_API_KEY": "kilnfakewandb0123456789abcdef0123456789ab",
    "AWS_SECRET_ACCESS_KEY": "KilnFakeAwsSecret/0123456789+abcdefghijkl",
}


class _Tags(HTMLParser):
    """Collects the tags a browser would build: a payload that survives escaping shows up here."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def hostile_config(folder) -> dict:
    rows = []
    for i in range(72):
        question = f"Question {i} {SCRIPT if i % 2 else ATTRIBUTE}"
        answer = f"Answer {i} {ATTRIBUTE if i % 3 else SCRIPT}"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    rows.append({"messages": [{"role": "user", "content": SCRIPT}]})  # rejected: no answer, shown with its reason
    (folder / "hostile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config()
    cfg["datasets"] = {
        "orders": {
            "sources": [{"name": "mine", "kind": "local", "path": "hostile.jsonl"}],
            # A pattern that names the payload: the manifest and pages show the config too.
            "clean": {"drop_patterns": [re.escape(SCRIPT) + "NEVER"]},
            "build": {"validation": 0.1, "test": 0.15, "seed": 0},
        }
    }
    return cfg


@pytest.mark.slow
def test_pages_escape_hostile_data_and_no_secret_is_written(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    wf = Workflow(tmp_path, hostile_config(tmp_path))
    wf.run()
    report = tmp_path / "report.html"
    wf.run("--report", str(report))

    pages = [p for p in (tmp_path / "results").rglob("*.html")]
    names = {p.name for p in pages}
    assert {"samples.html", "manifest.html", "experiments.html", "data_stats.html"} <= names, names
    shown = 0
    for page in pages:
        text = page.read_text()
        shown += text.count("&lt;script&gt;alert(") + text.count("&quot;&gt;&lt;img src=x")
        parser = _Tags()
        parser.feed(text)
        assert not [t for t, a in parser.tags if t in ("script", "img")], page
        assert not [a for _, a in parser.tags if any(k.startswith("on") for k in a)], page
    assert shown > 0  # the payloads are shown, as text

    leaks = []
    for path in [*(tmp_path / "results").rglob("*"), *(tmp_path / ".snakemake" / "log").rglob("*"), report]:
        if path.is_file():
            data = path.read_bytes()
            leaks += [(str(path), name) for name, value in SECRETS.items() if value.encode() in data]
    assert not leaks, leaks
    assert os.environ["HF_TOKEN"] == SECRETS["HF_TOKEN"]  # the run really had them
