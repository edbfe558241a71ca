"""The repository's own hygiene: ruff, snakefmt and `snakemake --lint` stay clean."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "scripts", "tests", "benchmarks"],
        ["ruff", "format", "--check", "scripts", "tests", "benchmarks"],
        ["snakefmt", "--check", "Snakefile", "rules"],
        ["snakemake", "--lint"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_clean(cmd):
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
