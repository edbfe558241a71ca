"""Code inputs derived from the imports: editing a module reruns the stages that run it, and no other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, tiny_config

from kiln.codedeps import code_files

ALL_RULES = {
    "collect",
    "clean",
    "build_dataset",
    "tokenize",
    "base_model",
    "train",
    "merge",
    "export_gguf",
    "ollama_modelfile",
    "evaluate",
    "manifest",
    "publish",
    "compare",
    "data_report",
}
AFTER_TRAIN = {"train", "merge", "export_gguf", "ollama_modelfile", "evaluate", "manifest", "publish", "compare"}


def test_imports_are_followed_everywhere_and_nothing_else(tmp_path):
    pkg = tmp_path / "kiln"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("import json\n")
    (pkg / "lazy.py").write_text("def f():\n    from kiln.sub.leaf import x\n")
    (pkg / "runner.py").write_text('RUNS = ("kiln.worker",)\nimport torch\n')
    (pkg / "worker.py").write_text("from kiln import lazy\n")
    (pkg / "unused.py").write_text("")
    entry = tmp_path / "entry.py"
    entry.write_text("from kiln.runner import go\n")
    got = {str(Path(p).relative_to(tmp_path)) for p in code_files(entry, pkg)}
    assert got == {
        "entry.py",
        "kiln/__init__.py",
        "kiln/runner.py",
        "kiln/worker.py",  # named in RUNS
        "kiln/lazy.py",  # `from kiln import lazy`
        "kiln/sub/__init__.py",  # a package's __init__ runs before its modules
        "kiln/sub/leaf.py",  # imported inside a function, and relatively from sub/__init__
    }


def test_the_hand_lists_missed_real_imports():
    # The reported case: merge and evaluate load the 4-bit base through kiln.backends.
    for script in ("merge", "evaluate", "train"):
        files = code_files(REPO / "scripts" / f"{script}.py")
        assert str(REPO / "scripts" / "kiln" / "backends.py") in files, script
    assert str(REPO / "scripts" / "kiln" / "ddp" / "worker.py") in code_files(REPO / "scripts" / "train.py")


def _copy_workflow(dst: Path) -> Path:
    """The workflow's files in a folder of their own (touching them must not touch the checkout)."""
    dst.mkdir(parents=True)
    for name in ("Snakefile", "rules", "scripts", "config", "report", "envs", "profiles"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.mark.slow
def test_editing_a_module_reruns_what_runs_it_and_what_follows(tmp_path):
    # Its own copy of the workflow, built once: the code inputs are paths into that copy.
    repo = _copy_workflow(tmp_path / "repo")
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    cmd = [*SNAKEMAKE, "-s", str(repo / "Snakefile"), "-d", str(work), "--configfile", str(work / "config.yaml")]
    built = subprocess.run([*cmd, "--cores", "2"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    old = time.time() - 3600  # every file of the workflow older than every output
    for path in repo.rglob("*"):
        os.utime(path, (old, old))

    def plan() -> set[str]:
        out = subprocess.run([*cmd, "-n", "--quiet", "rules", "--cores", "1"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        rules, table = set(), False
        for line in out.stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["job", "count"]:
                table = True
            elif table and len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "all"):
                rules.add(parts[0])
        return rules

    assert plan() == set()
    kiln = repo / "scripts" / "kiln"
    expected = {
        "backends.py": AFTER_TRAIN,  # was missed by merge and evaluate
        "merge.py": AFTER_TRAIN - {"train"},
        "clean.py": ALL_RULES - {"collect", "base_model"},  # clean, and build (it imports clean)
        "tokenize.py": AFTER_TRAIN | {"tokenize", "data_report"},
        "pages.py": {"manifest", "publish", "compare", "data_report"},
        "sources.py": ALL_RULES - {"base_model"},
        "base_model.py": ALL_RULES - {"collect", "clean", "build_dataset"},
    }
    for module, rules in expected.items():
        path = kiln / module
        original = path.read_bytes()
        # An edit, not a bare touch: Snakemake 9 skips an input whose content checksum is unchanged.
        path.write_bytes(original + b"\n# edited\n")
        try:
            assert plan() == rules, module
        finally:
            path.write_bytes(original)

    # Parse time: Kiln's own work at parse time (validation, derived code inputs, code version)
    # is a small part of a dry run; most of the rest is importing Snakemake itself.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import snakemake.cli"], check=True)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert plan() == set()
    dry_s = time.perf_counter() - t0
    assert dry_s - import_s < 2.0, (dry_s, import_s)
