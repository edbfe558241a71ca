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

from dataclasses import dataclass, field, fields

from kiln.spec import (
    SECTIONS,
    BuildSettings,
    CleanSettings,
    ConfigError,
    EvaluateSettings,
    ExportSettings,
    MergeSettings,
    TokenizeSettings,
    TrainingSettings,
)


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a dataset (config/schema.yaml `source`: which keys each kind takes, and
    their defaults, restated here as the fields' defaults for a source built outside the workflow)."""

    name: str
    kind: str  # synthetic, local, hf, url
    format: str = "auto"  # the record format; auto detects it per row
    columns: dict = field(default_factory=dict)  # canonical field -> the file's column
    encoding: str = "utf-8"
    weight: float = 1.0  # copies of each train row
    max_rows: int | None = None  # at most this many unique rows
    path: str | None = None  # local: a glob; hf: the Hub id or a builder name
    on_bad_file: str = "stop"  # local, url: stop, or skip (set the file aside with its reason)
    config_name: str | None = None  # hf
    revision: str | None = None  # hf: the commit
    allow_unpinned: bool = False  # hf
    split: str = "train"  # hf
    data_files: str | list | None = None  # hf
    urls: list = field(default_factory=list)  # url
    sha256: list = field(default_factory=list)  # url: one per url (None: unverified)
    allow_unverified: bool = False  # url
    timeout_s: float = 60  # url: longest wait for data
    deadline_s: float = 900  # url: longest whole download
    max_bytes: int = 1073741824  # url: largest download
    rows: int = 3000  # synthetic
    seed: int = 0  # synthetic
    mess_rate: float = 0.1  # synthetic: share of rows made messy
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, entry: dict) -> SourceSpec:
        keys = {f.name for f in fields(cls)} - {"config"}
        return cls(**{k: v for k, v in entry.items() if k in keys}, config=entry)


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
        for src in self.sources:
            if src.name == name:
                return src
        raise ConfigError(f"dataset '{self.name}' has no source '{name}'")

    def mixture(self) -> dict[str, dict]:
        """Each source's weight and max_rows: the build rule's parameter (only these of a source's
        settings rebuild the dataset)."""
        return {s.name: {"weight": s.weight, "max_rows": s.max_rows} for s in self.sources}

    def to_record(self) -> dict:
        """As experiment.json and the manifest record it: the name, then the config entry."""
        return {"name": self.name, **self.config}


@dataclass(frozen=True)
class ModelSpec:
    """A base model (config `models.<name>`; config/schema.yaml says which keys each kind takes)."""

    name: str
    kind: str  # gguf_package, hub, local, random
    package: str | None = None  # gguf_package: the Python package that holds the GGUF file
    file: str = "*.gguf"  # gguf_package: which file of it
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub: the commit
    allow_unpinned: bool = False
    path: str | None = None  # local
    hub_id: str | None = None  # the Hub repo the weights come from (the model card's base_model)
    tokenizer_from: str | None = None  # random: a model in `models` or a tokenizer folder
    seed: int = 0  # random: the weights' seed
    architecture: dict | None = None  # random: transformers config keys, model_type picks the class
    eos_token: str | None = None
    pad_token: str | None = None
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, name: str, entry: dict) -> ModelSpec:
        keys = {f.name for f in fields(cls)} - {"name", "config"}
        return cls(name=name, **{k: v for k, v in entry.items() if k in keys}, config=entry)

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
