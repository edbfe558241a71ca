"""The results tree in one place (kiln.layout): the rules build their paths from it, so every path it
names for a run is where that run's rules wrote; what reads a run afterwards (trace, repro, serve)
finds its files through it."""

from __future__ import annotations

import os

from kiln.config import tokenization_key, validate
from kiln.layout import Layout


def test_every_path_the_layout_names_is_where_the_run_wrote(tiny_run):
    cfg = validate(tiny_run.config)
    tree = Layout(str(tiny_run.workdir / cfg["results"]))
    key = tokenization_key(cfg, "tiny")
    (qtype,) = cfg["experiments"]["tiny"]["export"]["gguf"]
    source, shard = "synthetic", "synthetic"
    paths = [
        tree.shard("orders", "raw", source, shard),
        tree.shard("orders", "clean", source, shard),
        tree.shard("orders", "rejected", source, shard),
        tree.shard("orders", "stats", source, shard, "json"),
        tree.dataset("orders"),
        tree.dataset_stats("orders"),
        tree.build_rejected("orders"),
        tree.tokenized("orders", key),
        tree.tokenize_stats("orders", key),
        tree.data_report("orders", "data_stats.html"),
        tree.base("tiny"),
        tree.adapter("tiny"),
        tree.merged("tiny"),
        tree.metrics("tiny"),
        tree.manifest("tiny"),
        tree.experiment("tiny", "model"),
        tree.gguf("tiny", qtype),
        tree.gguf_report("tiny", qtype),
        tree.log("train", "tiny"),
        tree.benchmark("train", "tiny"),
        tree.outside("checkpoints", "tiny"),
        tree.run_file("experiments.csv"),
    ]
    missing = [p for p in paths if not os.path.exists(p)]
    assert not missing, missing


def test_the_layout_is_relative_to_its_root():
    tree = Layout("out")
    assert tree.adapter("e") == "out/e/adapter" and tree.tokenize_stats("d", "m-1") == "out/data/d/tokenized/m-1.json"
    assert tree.gguf("e", "{qtype}") == "out/e/gguf/model-{qtype}.gguf"  # a Snakemake wildcard as a name
