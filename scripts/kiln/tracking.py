"""Live tracking: MLflow through the Trainer's own callback when the config names a tracking URI."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def mlflow_setup(tracking: dict, experiment: str | None) -> list[str]:
    """MLflow through the Trainer's own callback when the config names a tracking URI, else nothing."""
    uri = tracking.get("mlflow_uri") or ""
    if not uri:
        return []
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise RuntimeError(f"tracking.mlflow_uri is {uri!r} but MLflow is not installed: pip install mlflow-skinny")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = tracking.get("mlflow_experiment") or "kiln"
    os.environ.setdefault("MLFLOW_FLATTEN_PARAMS", "TRUE")
    if "://" not in uri or uri.startswith("file:"):
        # A folder store is what was asked for; MLflow 3 wants this opt-in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    log.info("MLflow: run %r in experiment %r at %s", experiment, os.environ["MLFLOW_EXPERIMENT_NAME"], uri)
    return ["mlflow"]
