"""What training made, as a type: ``TrainedAdapter``, the ``experiment.json`` saved beside an adapter.

It holds what made the adapter (the experiment's dataset and model with their config, the tokenize
and training settings, the data's fingerprints) and what training resolved (backend, compute dtype,
quantization, the base model and where it lies relative to the adapter). Training writes it;
merge, evaluate and the manifest read it back as attributes instead of re-assembling the config.
``to_dict()`` is the file, key for key, as it was written before the type existed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.spec import SpecError, TokenizeSettings, TrainingSettings

ADAPTER_SPEC = "experiment.json"  # beside the adapter
VERSION = 1  # the file's "kiln_experiment"


@dataclass(frozen=True)
class TrainedAdapter:
    """One adapter's record: what made it and what training resolved."""

    experiment: str
    dataset: dict | None  # {"name": ..., **the dataset's config} (None: trained outside the workflow)
    model: dict | None  # {"name": ..., **the model's config}
    base_model_dir: str  # as training saw it
    base_model_relpath: str  # relative to the adapter folder: found wherever the results tree is read from
    base_identity: dict  # the base weights' identity.json
    backend: str
    backend_reason: str
    compute_dtype: str  # "float32", "bfloat16", ...
    quantization: str  # "nf4" or "none"
    training: TrainingSettings
    tokenize: TokenizeSettings
    data_fingerprints: dict  # split -> content fingerprint

    @property
    def quantized(self) -> bool:
        """Trained against a 4-bit (NF4) base."""
        return self.quantization == "nf4"

    def base_dir(self, adapter_dir: str | Path) -> str:
        """The base model's folder, found from the adapter's own."""
        return str(Path(adapter_dir) / self.base_model_relpath)

    def to_dict(self) -> dict:
        return {
            "kiln_experiment": VERSION,
            "experiment": self.experiment,
            "dataset": self.dataset,
            "model": self.model,
            "base_model_dir": self.base_model_dir,
            "base_model_relpath": self.base_model_relpath,
            "base_identity": self.base_identity,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "compute_dtype": self.compute_dtype,
            "quantization": self.quantization,
            "training": self.training.to_dict(),
            "tokenize": self.tokenize.to_dict(),
            "data_fingerprints": self.data_fingerprints,
        }

    @classmethod
    def from_dict(cls, record: dict, where: str = ADAPTER_SPEC) -> TrainedAdapter:
        values = {k: v for k, v in record.items() if k != "kiln_experiment"}
        try:
            values["training"] = TrainingSettings.from_dict(values.get("training"), "training")
            values["tokenize"] = TokenizeSettings.from_dict(values.get("tokenize"), "tokenize")
            return cls(**values)
        except (SpecError, TypeError) as e:
            raise ValueError(
                f"{where}: not an experiment.json this Kiln reads ({e}); retrain the adapter "
                "(delete it and rerun snakemake)"
            ) from None

    def write(self, adapter_dir: str | Path) -> None:
        (Path(adapter_dir) / ADAPTER_SPEC).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, adapter_dir: str | Path) -> TrainedAdapter:
        """The record training saved beside ``adapter_dir``, with a message a user can act on."""
        path = Path(adapter_dir) / ADAPTER_SPEC
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {adapter_dir} was not written by Kiln's train stage (or by an older Kiln); "
                "retrain it (snakemake reruns train when its outputs are incomplete)"
            )
        return cls.from_dict(json.loads(path.read_text()), str(path))
