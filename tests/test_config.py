import copy
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, tiny_config

from kiln.config import ConfigError, tokenization_key, validate
from kiln.experiment import DatasetSpec
from kiln.shards import dataset_shards

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled():
    cfg = validate(DEFAULT)
    src = cfg["datasets"]["orders"]["sources"][0]
    assert src["format"] == "auto" and src["columns"] == {}
    assert cfg["experiments"]["default"]["training"]["quantization"] == "nf4"
    assert cfg["experiments"]["default"]["merge"]["dtype"] == "auto"


def test_every_default_key_is_commented():
    # Each key line of the embedded default carries a comment on it or right above it.
    lines = (REPO / "config" / "config.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("- "):
            continue
        key = stripped.split(":")[0]
        value = stripped.split(":", 1)[1].strip()
        block = value == ""  # a section header: documented by its children or a banner
        if "#" in line or block or any(lines[j].strip().startswith("#") for j in range(max(0, i - 3), i)):
            continue
        undocumented.append(key)
    assert len(undocumented) <= 12, undocumented  # short groups share one comment


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda c: c["experiments"]["default"]["training"].update(lora_r="abc"),
            "experiments.default.training.lora_r: 'abc' is not of type 'integer'",
        ),
        (lambda c: c["experiments"]["default"]["training"].update(lr=1), "'lr' was unexpected"),
        (
            lambda c: c["experiments"]["default"].update(dataset="nope"),
            "experiments.default.dataset: 'nope' is not in `datasets`",
        ),
        (
            lambda c: c["datasets"]["orders"]["sources"][0].update(mess_rate=2),
            "datasets.orders.sources[0].mess_rate: 2 is greater than the maximum of 0.9",
        ),
        (
            lambda c: c["datasets"]["orders"]["build"].update(validation=0.5, test=0.5),
            "validation + test must be below 1",
        ),
        (lambda c: c["models"]["smollm2-135m"].update(kind="gguf"), "models.smollm2-135m.kind"),
    ],
)
def test_bad_config_names_the_key(mutate, expected):
    cfg = copy.deepcopy(DEFAULT)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_config_fails_the_dry_run_with_one_clear_line(tmp_path):
    cfg = tiny_config()
    cfg["experiments"]["tiny"]["training"]["max_steps"] = 0
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-n", "--cores", "1", "--configfile", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "config: experiments.tiny.training.max_steps: 0 is less than the minimum of 1" in proc.stdout + proc.stderr


def test_local_glob_matching_nothing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = validate(
        {
            "datasets": {"d": {"sources": [{"name": "x", "kind": "local", "path": "in/*.jsonl"}]}},
            "models": {"m": {"kind": "local", "path": "m"}},
            "experiments": {"e": {"dataset": "d", "model": "m"}},
        }
    )
    with pytest.raises(ConfigError, match="path 'in/\\*.jsonl' matches no files"):
        dataset_shards(DatasetSpec.from_config("d", cfg["datasets"]["d"]))


def test_experiments_differing_in_training_only_share_tokenization():
    cfg = copy.deepcopy(DEFAULT)
    cfg["experiments"]["lr_high"] = copy.deepcopy(cfg["experiments"]["default"])
    cfg["experiments"]["lr_high"]["training"]["learning_rate"] = 0.001
    cfg["experiments"]["long"] = copy.deepcopy(cfg["experiments"]["default"])
    cfg["experiments"]["long"]["tokenize"]["max_seq_len"] = 512
    cfg = validate(cfg)
    assert tokenization_key(cfg, "default") == tokenization_key(cfg, "lr_high")
    assert tokenization_key(cfg, "default") != tokenization_key(cfg, "long")


def test_dry_run_is_fast_and_imports_no_heavy_library(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        "from snakemake.cli import main\n"
        f"sys.argv = ['snakemake', '-s', {str(REPO / 'Snakefile')!r}, '-n', '--cores', '1']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules])\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert time.perf_counter() - start < 30


def test_base_inheritance_and_sweeps_expand_into_named_experiments():
    cfg = tiny_config()
    cfg["experiments"]["tiny_r8"] = {"base": "tiny", "training": {"lora_r": 8}}
    cfg["sweeps"] = {
        "lr": {"base": "tiny_r8", "grid": {"training.learning_rate": [0.001, 0.002], "tokenize.max_seq_len": [128]}}
    }
    out = validate(cfg)["experiments"]
    assert sorted(out) == [
        "lr-learning_rate0.001-max_seq_len128",
        "lr-learning_rate0.002-max_seq_len128",
        "tiny",
        "tiny_r8",
    ]
    # Inherited: everything of `tiny`, with the child's own keys on top.
    assert out["tiny_r8"]["training"]["lora_r"] == 8
    assert out["tiny_r8"]["training"]["max_steps"] == out["tiny"]["training"]["max_steps"]
    swept = out["lr-learning_rate0.001-max_seq_len128"]
    assert swept["training"]["learning_rate"] == 0.001 and swept["training"]["lora_r"] == 8
    assert swept["tokenize"]["max_seq_len"] == 128 and swept["dataset"] == "orders"


@pytest.mark.parametrize(
    "sweeps, expected",
    [
        ({"s": {"base": "nope", "grid": {"training.seed": [1]}}}, "sweeps.s.base: 'nope' is not in `experiments`"),
        ({"s": {"base": "tiny", "grid": {"trainin.seed": [1]}}}, "sweeps.s.grid.trainin.seed: name a setting"),
        ({"s": {"base": "tiny", "grid": {"training.seed": []}}}, "sweeps.s.grid.training.seed: expected a non-empty"),
        ({"s": {"base": "tiny", "grid": {"training.lora_r": ["x"]}}}, "lora_r"),
    ],
)
def test_bad_sweep_names_the_key(sweeps, expected):
    cfg = tiny_config()
    cfg["sweeps"] = sweeps
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("`", ".").replace("[", r"\[")):
        validate(cfg)


def test_inheritance_loop_is_reported():
    cfg = tiny_config()
    cfg["experiments"]["a"] = {"base": "b"}
    cfg["experiments"]["b"] = {"base": "a"}
    with pytest.raises(ConfigError, match="inheritance loops"):
        validate(cfg)


def test_a_local_model_folder_is_checked_when_the_workflow_is_parsed(tmp_path, monkeypatch):
    from kiln.shards import check_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = validate(
        {
            "datasets": {"d": {"sources": [{"name": "x", "kind": "synthetic"}]}},
            "models": {"m": {"kind": "local", "path": "my-model"}},
            "experiments": {"e": {"dataset": "d", "model": "m"}},
        }
    )
    with pytest.raises(ConfigError, match=r"models.m.path: folder 'my-model' does not exist \(relative paths are"):
        check_local_paths(cfg)
    (tmp_path / "my-model").mkdir()
    with pytest.raises(ConfigError, match="folder 'my-model' has no config.json"):
        check_local_paths(cfg)
    (tmp_path / "my-model" / "config.json").write_text("{}")
    check_local_paths(cfg)


def test_a_missing_local_model_stops_the_parse_with_one_line(workflow_factory, tmp_path):
    from conftest import tiny_config

    cfg = tiny_config()
    cfg["models"]["tiny"] = {"kind": "local", "path": str(tmp_path / "nowhere")}
    proc = workflow_factory(cfg).run(dry=True, check=False)
    assert proc.returncode != 0
    assert f"config: models.tiny.path: folder '{tmp_path / 'nowhere'}' does not exist" in proc.stdout + proc.stderr


def test_csv_columns_are_checked_when_the_workflow_is_parsed(tmp_path, monkeypatch):
    from kiln.shards import check_local_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "faq.csv").write_bytes(b"\xef\xbb\xbfquestion,answer\nq,a\n")  # a BOM, as Excel writes it
    source = {
        "name": "faq",
        "kind": "local",
        "path": "faq.csv",
        "columns": {"prompt": "question", "completion": "anwser"},
    }
    cfg = validate(
        {
            "datasets": {"d": {"sources": [source]}},
            "models": {"m": {"kind": "local", "path": "."}},
            "experiments": {"e": {"dataset": "d", "model": "m"}},
        }
    )
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        check_local_paths(cfg)
    assert str(err.value) == (
        "config: datasets.d.sources[0].columns: maps completion to column 'anwser', "
        "which is not in faq.csv (its columns: question, answer)"
    )
    cfg["datasets"]["d"]["sources"][0]["columns"]["completion"] = "answer"
    check_local_paths(cfg)
    cfg["datasets"]["d"]["sources"][0]["columns"]["completion"] = "anwser"
    cfg["datasets"]["d"]["sources"][0]["on_bad_file"] = "skip"  # set aside by its collect job instead
    check_local_paths(cfg)


def test_parquet_columns_are_checked_when_the_workflow_is_parsed(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kiln.shards import check_local_paths

    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "faq.parquet")
    source = {
        "name": "faq",
        "kind": "local",
        "path": "*.parquet",
        "columns": {"prompt": "question", "completion": "ans"},
    }
    cfg = validate(
        {
            "datasets": {"d": {"sources": [source]}},
            "models": {"m": {"kind": "local", "path": "."}},
            "experiments": {"e": {"dataset": "d", "model": "m"}},
        }
    )
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        ConfigError,
        match=r"maps completion to column 'ans', which is not in faq.parquet \(its columns: question, answer\)",
    ):
        check_local_paths(cfg)
    cfg["datasets"]["d"]["sources"][0]["columns"]["completion"] = "answer"
    check_local_paths(cfg)


def test_regression_sets_name_datasets_or_files():
    from kiln.config import regression_dataset_name, regression_datasets

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["experiments"]["default"]["evaluate"]["regression"] = ["data/general/*.txt"]
    resolved = validate(cfg)
    name = regression_dataset_name("data/general/*.txt")
    assert regression_datasets(resolved, "default") == [name]
    assert resolved["datasets"][name]["sources"][0]["path"] == "data/general/*.txt"
    assert resolved["datasets"][name]["build"]["test"] == 0.0
    cfg["experiments"]["default"]["evaluate"]["regression"] = ["orders"]
    with pytest.raises(ConfigError, match="evaluate.regression: 'orders' is the dataset the experiment trains on"):
        validate(cfg)
