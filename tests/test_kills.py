"""The kill campaign (issue 12): SIGKILL of the whole Snakemake process group at seeded random moments
in every stage of the tiny pipeline, each followed by the plain rerun; the last rerun completes and
every output equals an uninterrupted run's by content hash (tests/killcampaign.py says what is
exempt and why). benchmarks/kill_campaign.py runs the same campaign and keeps its figures."""

from __future__ import annotations

import json

import pytest
from conftest import Workflow, tiny_config
from killcampaign import PARSE, campaign

# Extra kills where the most is written: training, the merge; and two more in training once a new
# checkpoint is recorded (the rerun resumes from it; the second often lands after the last one).
EXTRA = {"train": 1, "merge": 1}
AFTER_CHECKPOINT = 2


@pytest.mark.slow
def test_every_killed_run_comes_back_to_the_same_outputs(tmp_path):
    wf = Workflow(tmp_path / "run", tiny_config())
    summary = campaign(wf.command(), wf.workdir, 12, EXTRA, AFTER_CHECKPOINT)
    (tmp_path / "campaign.json").write_text(json.dumps(summary, indent=1))
    detail = json.dumps(summary, indent=1)
    assert summary["kills"] >= 10, detail
    assert summary["completed"], detail
    # Every stage of the reference run had a kill land while it ran (the parse counts as one).
    assert PARSE in summary["stages"] and set(summary["stages_hit"]) == set(summary["stages"]), detail
    # At least one kill stopped training after a complete checkpoint: the rerun resumed from it.
    # (The kills aimed after a new checkpoint make this sure: they wait for one to be recorded.)
    assert any(k["checkpoints"] and k["running"] == ["train"] for k in summary["schedule"]), detail
    # Every job a kill stopped was finished by a later plain run.
    assert all(k["finished_by_run"] for k in summary["schedule"] if k["at_s"] >= 0), detail
    assert summary["different"] == [] and summary["missing"] == [] and summary["extra"] == [], detail
    assert summary["identical"] == summary["checked"] > 80, detail


def test_readme_quotes_the_committed_campaign():
    """README's kill-campaign figures are those of benchmarks/results/kill_campaign.json."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = json.loads((repo / "benchmarks" / "results" / "kill_campaign.json").read_text())
    readme = " ".join((repo / "README.md").read_text().split())
    m = re.search(
        r"\*\*(\d+) kills landed over all (\d+) stages, (\d+) runs, the last completed, "
        r"(\d+) of (\d+) compared files identical\*\*.*?in (\d+) s",
        readme,
    )
    assert m, "README lost its kill-campaign line"
    quoted = [int(x) for x in m.groups()]
    assert quoted == [
        result["kills"],
        len(result["stages"]),
        result["runs"],
        result["identical"],
        result["checked"],
        round(result["campaign_s"]),
    ]
    assert result["completed"] and set(result["stages_hit"]) == set(result["stages"])
    assert result["machine"]["date"] in readme
