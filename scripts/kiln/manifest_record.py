"""The manifest as a type: ``Manifest`` reads manifest.json (the experiment's config with each
stage's settings typed, the data's fingerprints, the base weights' identity, what training did, the
GGUF reports and the metrics, each a kiln.reports record). The pages, the model card, the
comparison and ``kiln repro`` read it as attributes; ``ManifestConfig.to_config`` gives back the
Kiln config that rebuilds the experiment. The manifest job writes the file as plain data
(kiln.manifest); this module only reads it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pydantic import field_validator

from kiln.reports import GgufReport, MergeReport, Metrics, Record, Split
from kiln.spec import (
    EvaluateSettings,
    ExportSettings,
    MergeSettings,
    SpecError,
    TokenizeSettings,
    TrainingSettings,
)


# ---- the manifest ----------------------------------------------------------------------------
class SourceRecord(Record):
    """One data source as the manifest recorded its config (kiln.sources reads every kind)."""

    name: str
    kind: str
    path: str | None = None
    revision: str | None = None
    allow_unpinned: bool = False
    seed: int | None = None

    def relocated(self, base_dir: str | Path) -> SourceRecord:
        """A local source's relative path made absolute against the original run's folder."""
        if self.kind == "local" and self.path and not os.path.isabs(self.path):
            return self.model_copy(update={"path": _absolute(base_dir, self.path)})
        return self


def _absolute(base_dir: str | Path, path: str) -> str:
    return str(Path(base_dir, path).resolve())


class DatasetRecord(Record):
    name: str
    sources: list[SourceRecord]
    build: dict = {}

    def relocated(self, base_dir: str | Path) -> DatasetRecord:
        return self.model_copy(update={"sources": [s.relocated(base_dir) for s in self.sources]})

    def to_config(self) -> dict:
        """The dataset's entry under ``datasets:`` (its name is the key)."""
        return {k: v for k, v in self.to_dict().items() if k != "name"}


class ModelRecord(Record):
    name: str
    kind: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    allow_unpinned: bool = False
    tokenizer_from: str | None = None

    def relocated(self, base_dir: str | Path) -> ModelRecord:
        """Relative local paths (a local model, a random model's tokenizer folder) made absolute."""
        update = {}
        if self.kind == "random" and self.tokenizer_from and os.path.isdir(Path(base_dir, self.tokenizer_from)):
            update["tokenizer_from"] = _absolute(base_dir, self.tokenizer_from)
        if self.kind == "local" and self.path and not os.path.isabs(self.path):
            update["path"] = _absolute(base_dir, self.path)
        return self.model_copy(update=update) if update else self

    def to_config(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k != "name"}


def _settings(kind, value, where: str):
    if isinstance(value, kind):
        return value
    try:
        return kind.from_dict(value, where)
    except (SpecError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


class ExperimentRecord(Record):
    """The experiment's own config section, each stage's settings typed (kiln.spec)."""

    dataset: str
    model: str
    tokenize: TokenizeSettings
    training: TrainingSettings
    merge: MergeSettings = MergeSettings()
    export: ExportSettings = ExportSettings()
    evaluate: EvaluateSettings = EvaluateSettings()

    @field_validator("tokenize", "training", "merge", "export", "evaluate", mode="before")
    @classmethod
    def _typed(cls, value, info):
        kinds = {"tokenize": TokenizeSettings, "training": TrainingSettings, "merge": MergeSettings}
        kinds |= {"export": ExportSettings, "evaluate": EvaluateSettings}
        return _settings(kinds[info.field_name], value, info.field_name)

    def relocated(self, base_dir: str | Path, regression: list[str]) -> ExperimentRecord:
        """The harness's relative include_path made absolute; evaluate.regression naming the
        datasets the manifest recorded for it."""
        harness = dict(self.evaluate.lm_eval or {})
        if harness.get("include_path") and not os.path.isabs(harness["include_path"]):
            harness["include_path"] = _absolute(base_dir, harness["include_path"])
        update = {"lm_eval": harness} if self.evaluate.lm_eval else {}
        if regression:
            update["regression"] = regression
        if not update:
            return self
        return self.model_copy(update={"evaluate": dataclasses.replace(self.evaluate, **update)})


class RegressionEntry(Record):
    dataset: DatasetRecord  # the dataset an evaluate.regression entry named, its config included


class ManifestConfig(Record):
    experiment: ExperimentRecord
    dataset: DatasetRecord
    model: ModelRecord
    regression_datasets: list[RegressionEntry] = []

    def to_config(self, name: str, results: str, base_dir: str | Path = ".") -> dict:
        """A Kiln config with only this experiment, its dataset and model (and the datasets of its
        regression sets), outputs under ``results``; relative local paths made absolute against
        ``base_dir``, the original run's folder, so a rebuild elsewhere reads the same raw files."""
        extra = [e.dataset.relocated(base_dir) for e in self.regression_datasets]
        exp = self.experiment.relocated(base_dir, [d.name for d in extra])
        datasets = {d.name: d.to_config() for d in [self.dataset.relocated(base_dir), *extra]}
        return {
            "results": results,
            "datasets": datasets,
            "models": {self.model.name: self.model.relocated(base_dir).to_config()},
            "experiments": {name: exp.to_dict()},
        }


class PromptExample(Record):
    messages: list[dict]
    reference: str


class BaseIdentity(Record):
    """The prepared base model's identity.json: where the weights came from and their hashes."""

    kind: str | None = None
    id: str
    revision: str | None = None
    hub_id: str | None = None
    dtype: str | None = None
    source_files: dict[str, str] = {}
    weights: dict[str, str] | None = None


class TrainingRun(Record):
    """What training resolved and did (from experiment.json and train_summary.json)."""

    backend: str
    backend_reason: str = ""
    compute_dtype: str = ""
    steps: int
    tokens_trained: int
    first_loss: float
    final_loss: float
    device: str = ""
    hardware: dict | None = None


class CodeVersion(Record):
    """kiln.provenance.code_version: the checkout's commit (None, with a note, outside git)."""

    commit: str | None = None
    dirty: bool | None = False  # None: not a git checkout
    diff_sha256: str | None = None
    note: str | None = None

    def short(self) -> str | None:
        """The commit's first ten digits, ``+dirty`` with uncommitted changes (None: no git checkout)."""
        return (self.commit[:10] + ("+dirty" if self.dirty else "")) if self.commit else None


class StageRun(Record):
    jobs: int
    wall_s: float | None = None
    max_rss_mb: float | None = None
    cpu_time_s: float | None = None


class DataRecord(Record):
    splits: dict[str, Split]
    rows_in: int | None = None
    rejected_in_build: int | None = None
    downloads: list[dict] = []
    tokenized: dict[str, dict] = {}


class FileHashes(Record):
    files: dict[str, str]


class MergedRecord(FileHashes):
    report: MergeReport


class Manifest(Record):
    """manifest.json: everything needed to say how one model was made and how it scored."""

    kiln_manifest: int = 1
    experiment: str
    prompt_example: PromptExample | None = None
    config: ManifestConfig
    data: DataRecord
    base_model: BaseIdentity
    adapter: FileHashes | None = None
    merged: MergedRecord
    gguf: dict[str, GgufReport] = {}
    training: TrainingRun
    seeds: dict = {}
    code: CodeVersion = CodeVersion()
    packages: dict[str, str | None] = {}
    workflow_packages: dict[str, str | None] = {}
    hardware: dict = {}
    stages: dict[str, StageRun | None] = {}
    metrics: Metrics

    def unpinned_inputs(self) -> list[str]:
        return unpinned_inputs(self.config.model, self.config.dataset)


def unpinned_inputs(model: ModelRecord, dataset: DatasetRecord) -> list[str]:
    """Hub inputs taken at a revision that is not a commit (allowed by allow_unpinned): they may
    hold other bytes if fetched again."""
    out = []
    if model.allow_unpinned:
        out.append(f"base model {model.repo_id} at revision {model.revision!r} (allow_unpinned)")
    for src in dataset.sources:
        if src.allow_unpinned:
            out.append(f"data source {src.name} ({src.path}) at revision {src.revision!r} (allow_unpinned)")
    return out
