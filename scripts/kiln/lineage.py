"""Trace one row through the data stages: its raw record, what cleaning did, and where it ended up.

A row's ``kiln_id`` is a hash of its content, so identical records share one id: a trace lists every
raw occurrence (source, file, row) with its own fate, matched stage to stage by (file, row).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from kiln.layout import Layout


class TraceError(LookupError):
    """The id is unknown, ambiguous, or the dataset has not been built."""


def _find(paths: list[Path], column: str, value: str) -> pa.Table | None:
    """Rows of a set of Parquet files whose ``column`` equals ``value`` (file path added)."""
    if not paths:
        return None
    hits = []
    for path in paths:
        table = pq.read_table(path, filters=[(column, "=", value)])
        if table.num_rows:
            hits.append(table.append_column("_path", pa.array([str(path)] * table.num_rows)))
    return pa.concat_tables(hits, promote_options="default") if hits else None


def _resolve_id(data_dir: Path, prefix: str) -> str:
    """The full id for an id or a unique prefix of one (looked up in the raw shards)."""
    raw = list((data_dir / "raw").rglob("*.parquet"))
    if not raw:
        raise TraceError(f"{data_dir}/raw has no shards: build the dataset first (snakemake --cores 1)")
    if len(prefix) >= 16:
        return prefix
    ids = pads.dataset([str(p) for p in raw]).to_table(columns=["kiln_id"]).column("kiln_id")
    matches = pc.unique(ids.filter(pc.starts_with(ids, prefix))).to_pylist()
    if not matches:
        raise TraceError(f"no row of {data_dir} has an id starting with {prefix!r}")
    if len(matches) > 1:
        raise TraceError(f"{prefix!r} is ambiguous in {data_dir}: {', '.join(sorted(matches)[:10])}")
    return matches[0]


def trace(results: str | Path, dataset: str, row_id: str) -> dict:
    """Everything the data stages know about one id, as a JSON-able dict."""
    tree = Layout(str(results))
    data_dir = Path(tree.data(dataset))
    if not data_dir.is_dir():
        raise TraceError(f"{data_dir} does not exist: no dataset '{dataset}' under {results}")
    kiln_id = _resolve_id(data_dir, row_id)
    raw = _find(sorted((data_dir / "raw").rglob("*.parquet")), "kiln_id", kiln_id)
    if raw is None:
        raise TraceError(f"no raw row of dataset '{dataset}' has id {kiln_id}")
    clean = _find(sorted((data_dir / "clean").rglob("*.parquet")), "kiln_id", kiln_id)
    rejected = _find(sorted((data_dir / "rejected").rglob("*.parquet")), "kiln_id", kiln_id)
    build_rej_path = Path(tree.build_rejected(dataset))
    build_rej = _find([build_rej_path] if build_rej_path.exists() else [], "kiln_id", kiln_id)
    split = _split_of(Path(tree.dataset(dataset)), kiln_id)

    def by_place(table: pa.Table | None) -> dict:
        if table is None:
            return {}
        return {(r["file"], r["row"]): r for r in table.to_pylist()}

    clean_at, rejected_at, build_at = by_place(clean), by_place(rejected), by_place(build_rej)
    occurrences = []
    for r in raw.to_pylist():
        place = (r["file"], r["row"])
        occ = {
            "source": r["source"],
            "file": r["file"],
            "row": r["row"],
            "format": r["format"],
            "raw_shard": r["_path"],
            "raw": r["raw"],
            "read_error": r["error"],
        }
        if place in rejected_at:
            rej = rejected_at[place]
            occ["clean"] = {"status": "rejected", "reason": rej["reason"], "detail": rej["detail"]}
            occ["fate"] = f"rejected by clean: {rej['reason']} ({rej['detail']})"
        elif place in clean_at:
            c = clean_at[place]
            occ["clean"] = {
                "status": "kept",
                "edits": [e for e in (c["edits"] or "").split(",") if e],
                "messages": c["messages"],
                "content_hash": c["content_hash"],
                "n_chars": c["n_chars"],
            }
            if place in build_at:
                b = build_at[place]
                occ["build"] = {"status": "rejected", "reason": b["reason"], "detail": b["detail"]}
                occ["fate"] = f"rejected by build: {b['reason']} ({b['detail']})"
            elif split:
                occ["build"] = {"status": "kept", "split": split}
                occ["fate"] = f"in the {split} split"
            else:
                occ["fate"] = "kept by clean; not in the built dataset (rebuild it)"
        else:
            occ["fate"] = "not cleaned yet (run the workflow)"
        occurrences.append(occ)
    return {"kiln_id": kiln_id, "dataset": dataset, "split": split, "occurrences": occurrences}


def _split_of(dataset_dir: Path, kiln_id: str) -> str | None:
    """The split of the built dataset that holds the id (None if none does)."""
    if not (dataset_dir / "dataset_dict.json").exists():
        return None
    splits = json.loads((dataset_dir / "dataset_dict.json").read_text())["splits"]
    for split in splits:
        state = json.loads((dataset_dir / split / "state.json").read_text())
        for entry in state["_data_files"]:
            f = dataset_dir / split / entry["filename"]
            with pa.memory_map(str(f)) as source:
                table = pa.ipc.open_stream(source).read_all()
            if pc.any(pc.equal(table.column("kiln_id"), kiln_id)).as_py():
                return split
    return None


def format_trace(result: dict) -> str:
    """A trace as text for a terminal."""
    lines = [f"row {result['kiln_id']} of dataset '{result['dataset']}'"]
    if len(result["occurrences"]) > 1:
        lines.append(f"  {len(result['occurrences'])} raw records have this content")
    for occ in result["occurrences"]:
        lines += [
            "",
            f"raw: source '{occ['source']}', file {occ['file']}, row {occ['row']} (format {occ['format']})",
            f"     shard {occ['raw_shard']}",
            "     " + (occ["raw"] or "").replace("\n", "\n     ")[:2000],
        ]
        if occ["read_error"]:
            lines.append(f"     read error: {occ['read_error']}")
        clean = occ.get("clean")
        if clean and clean["status"] == "kept":
            edits = ", ".join(clean["edits"]) or "none (already clean)"
            lines.append(f"clean: kept; edits: {edits}; {clean['n_chars']} chars; content hash {clean['content_hash']}")
            for turn in clean["messages"]:
                lines.append(f"     {turn['role']}: {turn['content'][:300]!r}")
        elif clean:
            lines.append(f"clean: REJECTED, {clean['reason']}: {clean['detail']}")
        lines.append(f"=> {occ['fate']}")
    return "\n".join(lines)
