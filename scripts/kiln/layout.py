"""The results tree: where each output of a run lies under the config's ``results:`` folder, in one
place. The rules build their paths from it (Snakemake wildcards as the names:
``L.adapter("{experiment}")``) and refer to another rule's output as ``rules.<rule>.output.<name>``;
what finds outputs after a run (``kiln trace``, ``kiln repro``, ``kiln serve``, the run summary)
asks it too, instead of each knowing the tree again.

    results/
      data/<dataset>/        raw/ clean/ rejected/ stats/ <source>/<shard>.*, dataset/,
                             dataset_stats.json, build_rejected.parquet, tokenized/<model>-<hash>[.json],
                             report/
      base/<model>/          the prepared base model (safetensors, tokenizer, identity.json)
      <experiment>/          adapter/, merged/, gguf/, metrics.json, samples.jsonl, manifest.json,
                             model/ (published), train_log.jsonl, train_summary.json, ...
      logs/ benchmarks/      one file per job: <rule>/<name>.log, .tsv
      checkpoints/ cache/    outside every declared output (a failed job's outputs are deleted)
      experiments.csv ...    the comparison; plots/
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    root: str = "results"

    # ---- data: one folder per dataset ---------------------------------------------------------
    def data(self, dataset: str) -> str:
        return f"{self.root}/data/{dataset}"

    def shard(self, dataset: str, table: str, source: str, shard: str, suffix: str = "parquet") -> str:
        """One shard's file of a stage: ``raw``, ``clean``, ``rejected`` (parquet) or ``stats`` (json)."""
        return f"{self.data(dataset)}/{table}/{source}/{shard}.{suffix}"

    def dataset(self, dataset: str) -> str:
        return f"{self.data(dataset)}/dataset"

    def dataset_stats(self, dataset: str) -> str:
        return f"{self.data(dataset)}/dataset_stats.json"

    def build_rejected(self, dataset: str) -> str:
        return f"{self.data(dataset)}/build_rejected.parquet"

    def tokenized(self, dataset: str, key: str) -> str:
        """One tokenization of a dataset (``key``: ``<model>-<settings hash>``); its record is ``.json``."""
        return f"{self.data(dataset)}/tokenized/{key}"

    def tokenize_stats(self, dataset: str, key: str) -> str:
        return f"{self.tokenized(dataset, key)}.json"

    def data_report(self, dataset: str, file: str) -> str:
        return f"{self.data(dataset)}/report/{file}"

    # ---- models and experiments ---------------------------------------------------------------
    def base(self, model: str) -> str:
        return f"{self.root}/base/{model}"

    def experiment(self, name: str, file: str = "") -> str:
        """The experiment's folder, or a file in it (``metrics.json``, ``train_log.jsonl``, ...)."""
        return f"{self.root}/{name}/{file}" if file else f"{self.root}/{name}"

    def adapter(self, name: str) -> str:
        return self.experiment(name, "adapter")

    def merged(self, name: str) -> str:
        return self.experiment(name, "merged")

    def metrics(self, name: str) -> str:
        return self.experiment(name, "metrics.json")

    def manifest(self, name: str) -> str:
        return self.experiment(name, "manifest.json")

    def gguf(self, name: str, qtype: str) -> str:
        return self.experiment(name, f"gguf/model-{qtype}.gguf")

    def gguf_report(self, name: str, qtype: str) -> str:
        """The GGUF file's verification in llama.cpp."""
        return self.experiment(name, f"gguf/verify-{qtype}.json")

    # ---- the run's own records -------------------------------------------------------------------
    def log(self, rule: str, name: str) -> str:
        return f"{self.root}/logs/{rule}/{name}.log"

    def benchmark(self, rule: str, name: str) -> str:
        """A job's Snakemake ``benchmark:`` record (wall time, peak memory)."""
        return f"{self.root}/benchmarks/{rule}/{name}.tsv"

    def outside(self, kind: str, name: str) -> str:
        """``checkpoints`` and ``cache``: kept outside every declared output, which Snakemake deletes
        when a job fails."""
        return f"{self.root}/{kind}/{name}"

    def run_file(self, file: str) -> str:
        """A file about all experiments: the comparison tables, ``plots/``, the report."""
        return f"{self.root}/{file}"
