"""The conda envs for `--sdm conda` agree with pyproject.toml and cover what each rule imports.

`snakemake --sdm conda` itself cannot run on these machines (no conda channel is reachable), so
this checks what can be checked without building the envs.
"""

import ast
import re
import tomllib
from pathlib import Path

import yaml
from conftest import REPO

PINS = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)$")


def env(name: str) -> dict:
    return yaml.safe_load((REPO / "envs" / f"{name}.yaml").read_text())


def pip_pins(spec: dict) -> dict[str, str]:
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return {m.group(1).lower(): m.group(2) for line in pip if (m := PINS.match(line))}


def test_model_env_pins_the_versions_pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {m.group(1).lower(): m.group(2) for dep in project if (m := PINS.match(dep))}
    env_pins = pip_pins(env("model"))
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        assert env_pins[name] == pinned[name], name


def _imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_each_env_has_the_third_party_packages_its_rules_import():
    # Distribution name in an env file -> the module it provides, where they differ.
    provides = {"pyyaml": "yaml", "matplotlib-base": "matplotlib", "python-xxhash": "xxhash"}
    rules = {
        "data": ["sources", "records", "synthetic", "clean", "dataset", "pages", "compare", "card", "reports"],
        "model": ["base_model", "tokenize", "train", "backends", "merge", "evaluate", "manifest", "manifest_record"],
    }
    stdlib_or_ours = {"kiln", "__future__"} | set(__import__("sys").stdlib_module_names)
    optional = {"unsloth", "huggingface_hub", "mlflow", "lm_eval"}  # GPU extra; hub downloads; tracking; lm-eval extra
    for name, modules in rules.items():
        spec = env(name)
        have = set()
        for dep in spec["dependencies"]:
            items = dep["pip"] if isinstance(dep, dict) else [dep]
            for item in items:
                dist = re.split(r"[=<>\s]", item.strip())[0].lower()
                have.add(provides.get(dist, dist.replace("-", "_")))
        needed = set()
        for module in modules:
            needed |= _imports(REPO / "scripts" / "kiln" / f"{module}.py")
        missing = needed - stdlib_or_ours - have - optional
        if name == "data":
            missing -= {"datasketch"}
        assert not missing, f"envs/{name}.yaml lacks {sorted(missing)}"
