"""The resolved experiment: what ``kiln.config.resolve`` gives the workflow for each experiment once the
config is valid. An ``Experiment`` holds its dataset and model specs (not their names) and every
stage's typed settings (kiln.spec); the rules read these (``EXPERIMENTS[w.experiment].export.gguf``)
instead of indexing the config.

Each spec keeps the entry it was made from as ``config`` (the validated dict, defaults filled):
that is what the rules pass on as Snakemake params and what ``experiment.json`` records, so
Snakemake's change detection sees the same plain data as before the types. The typed fields are
those the workflow and the audit read; a source or model kind's other options stay in ``config``
for kiln.sources and kiln.base_model, which read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.spec import (
    SECTIONS,
    BuildSettings,
    CleanSettings,
    EvaluateSettings,
    ExportSettings,
    MergeSettings,
    TokenizeSettings,
    TrainingSettings,
)


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a dataset (config/schema.yaml `source`)."""

    name: str
    kind: str  # synthetic, local, hf, url
    weight: float = 1.0  # copies of each train row
    max_rows: int | None = None  # at most this many unique rows
    path: str | None = None  # local: a glob; hf: the Hub id or builder
    revision: str | None = None  # hf: the commit
    allow_unpinned: bool = False
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, entry: dict) -> SourceSpec:
        keys = ("name", "kind", "weight", "max_rows", "path", "revision", "allow_unpinned")
        return cls(**{k: entry[k] for k in keys if k in entry}, config=entry)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its sources and the clean and build settings (config `datasets.<name>`)."""

    name: str
    sources: tuple[SourceSpec, ...]
    clean: CleanSettings
    build: BuildSettings
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, name: str, entry: dict) -> DatasetSpec:
        where = f"datasets.{name}"
        clean = CleanSettings.from_dict(entry.get("clean"), f"{where}.clean")
        build = BuildSettings.from_dict(entry.get("build"), f"{where}.build")
        sources = tuple(SourceSpec.from_config(s) for s in entry["sources"])
        return cls(name=name, sources=sources, clean=clean, build=build, config=entry)

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)

    def mixture(self) -> dict[str, dict]:
        """Each source's weight and max_rows: the build rule's parameter (only these of a source's
        settings rebuild the dataset)."""
        return {s.name: {"weight": s.weight, "max_rows": s.max_rows} for s in self.sources}

    def to_record(self) -> dict:
        """As experiment.json and the manifest record it: the name, then the config entry."""
        return {"name": self.name, **self.config}


@dataclass(frozen=True)
class ModelSpec:
    """A base model (config `models.<name>`)."""

    name: str
    kind: str  # gguf_package, hub, local, random
    path: str | None = None  # local
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub: the commit
    allow_unpinned: bool = False
    tokenizer_from: str | None = None  # random: a model in `models` or a tokenizer folder
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, name: str, entry: dict) -> ModelSpec:
        keys = ("kind", "path", "repo_id", "revision", "allow_unpinned", "tokenizer_from")
        return cls(name=name, **{k: entry[k] for k in keys if k in entry}, config=entry)

    def to_record(self) -> dict:
        return {"name": self.name, **self.config}


@dataclass(frozen=True)
class Experiment:
    """One resolved experiment: its name, the dataset and model it trains, every stage's settings,
    and the datasets its regression sets name."""

    name: str
    dataset: DatasetSpec
    model: ModelSpec
    tokenize: TokenizeSettings
    training: TrainingSettings
    merge: MergeSettings
    export: ExportSettings
    evaluate: EvaluateSettings
    regression: tuple[DatasetSpec, ...] = ()

    @classmethod
    def from_config(cls, name: str, cfg: dict, regression: list[str] = ()) -> Experiment:
        """From a validated config (kiln.config.validate): ``regression`` the dataset names of the
        experiment's evaluate.regression entries (kiln.config.regression_datasets)."""
        exp, where = cfg["experiments"][name], f"experiments.{name}"
        parts = {s: kind.from_dict(exp.get(s), f"{where}.{s}") for s, kind in SECTIONS.items()}
        spec = cls(
            name=name,
            dataset=DatasetSpec.from_config(exp["dataset"], cfg["datasets"][exp["dataset"]]),
            model=ModelSpec.from_config(exp["model"], cfg["models"][exp["model"]]),
            regression=tuple(DatasetSpec.from_config(d, cfg["datasets"][d]) for d in regression),
            **parts,
        )
        spec.training.check(f"{where}.training")
        return spec

    def adapter_spec(self) -> dict:
        """What made the adapter, as plain data: the train rule's parameter, saved beside the adapter
        with what training resolved (kiln.trained.TrainedAdapter: ``experiment.json``); merge,
        evaluate, the manifest and repro read it there."""
        return {
            "name": self.name,
            "dataset": self.dataset.to_record(),
            "model": self.model.to_record(),
            "tokenize": self.tokenize.to_dict(),
            "training": self.training.to_dict(),
        }

    def stage_settings(self) -> dict:
        """The settings of the stages after training, and each regression entry with the dataset it
        names: the manifest rule's parameter (kiln repro rebuilds from it)."""
        entries = zip(self.evaluate.regression, self.regression)
        return {
            "merge": self.merge.to_dict(),
            "export": self.export.to_dict(),
            "evaluate": self.evaluate.to_dict(),
            "regression_datasets": [{"entry": e, "dataset": d.to_record()} for e, d in entries],
        }
