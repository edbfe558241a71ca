"""A failed check keeps its evidence where Snakemake does not delete it.

Snakemake removes the outputs of a failed job, and the GGUF verify report and the merge report are
outputs: the file a failure pointed at was gone when the user looked. The rule's log folder
survives; ``write_report`` writes the report as the rule's output and, when the check failed, a copy
beside the rule's log, whose path the error names.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, report_path: str | Path, log_path: str | Path | None, failed: bool) -> Path:
    """Write ``report`` to ``report_path``; when ``failed``, also beside ``log_path`` (same name as the
    log, ``.json``). Returns the file that will still be there after Snakemake cleans up."""
    text = json.dumps(report, indent=2)
    Path(report_path).write_text(text)
    if not failed or not log_path:
        return Path(report_path)
    kept = Path(log_path).with_suffix(".json")
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(text)
    return kept
