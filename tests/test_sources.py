import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.experiment import SourceSpec
from kiln.sources import CollectError, collect_shard


def local_source(path, **extra) -> dict:
    """A local source as a config names it."""
    return {"name": "in", "kind": "local", "path": str(path), **extra}


def collect(tmp_path, src, shard):
    out = tmp_path / "raw.parquet"
    collect_shard(SourceSpec.from_config(src), shard, out)
    return pq.read_table(out).to_pylist()


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_jsonl_rows_keep_lineage_and_bad_lines_keep_their_reason(tmp_path):
    f = tmp_path / "data" / "a.jsonl"
    f.parent.mkdir()
    f.write_bytes(
        json.dumps(CHAT).encode()
        + b"\n\n{not json\n"
        + b'{"text": "caf\xe9"}\n'
        + json.dumps({"prompt": "p"}).encode()
        + b"\n"
    )
    rows = collect(tmp_path, local_source(tmp_path / "data" / "*.jsonl"), "a.jsonl")
    assert [r["row"] for r in rows] == [1, 3, 4, 5]  # blank line 2 is layout
    assert rows[0]["error"] is None and rows[0]["source"] == "in" and rows[0]["file"].endswith("a.jsonl")
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "yo"}
    assert "malformed JSON at column 2" in rows[1]["error"]
    assert "not valid utf-8 at byte" in rows[2]["error"]
    assert "no known format matches keys ['prompt']" in rows[3]["error"]
    assert len({r["kiln_id"] for r in rows}) == 4


def test_csv_json_parquet_and_txt(tmp_path):
    import pyarrow as pa

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("instruction,input,output\nsay hi,,hi\ncount,1 2,3\n")
    (d / "b.json").write_text(json.dumps({"data": [{"prompt": "p", "completion": "c"}]}))
    pq.write_table(
        pa.Table.from_pylist([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]),
        d / "c.parquet",
    )
    (d / "d.txt").write_text("first line\n\nsecond line\n")
    src = local_source(d / "*")
    csv = collect(tmp_path, src, "a.csv")
    assert [r["row"] for r in csv] == [2, 3] and csv[1]["messages"][0]["content"] == "count\n\n1 2"
    assert collect(tmp_path, src, "b.json")[0]["format"] == "prompt_completion"
    assert collect(tmp_path, src, "c.parquet")[0]["format"] == "sharegpt"
    txt = collect(tmp_path, src, "d.txt")
    assert [(r["row"], r["kind"]) for r in txt] == [(1, "text"), (3, "text")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "file is empty"),
        ("cols.csv", b"question,answer\nq,a\n", "no row could be read; first problem, row 2: field '(record)'"),
        ("latin.csv", b"text\ncaf\xe9\n", "not valid utf-8 at line 2"),
        ("broken.json", b'[{"text": "a"},\n {"text": }]', "malformed JSON at line 2, column 11"),
        ("x.xml", b"<a/>", "unsupported file type '.xml'"),
    ],
)
def test_whole_file_problems_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CollectError) as err:
        collect(tmp_path, local_source(tmp_path / "*"), name)
    assert str(tmp_path / name) in str(err.value) and message in str(err.value)


def test_encoding_setting_reads_other_encodings(tmp_path):
    (tmp_path / "latin.csv").write_bytes(b"text\ncaf\xe9\n")
    rows = collect(tmp_path, local_source(tmp_path / "*.csv", encoding="latin-1"), "latin.csv")
    assert rows[0]["messages"][0]["content"] == "café"


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_source_downloads_checks_sha256_and_reports_failures(tmp_path, http_server):
    root, base = http_server
    body = (json.dumps(CHAT) + "\n").encode()
    (root / "orders.jsonl").write_bytes(body)
    good = hashlib.sha256(body).hexdigest()
    src = {
        "name": "web",
        "kind": "url",
        "urls": [f"{base}/orders.jsonl"],
        "sha256": [good],
        "timeout_s": 5,
        "format": "auto",
        "columns": {},
    }
    rows = collect(tmp_path, src, "000-orders.jsonl")
    assert rows[0]["file"] == f"{base}/orders.jsonl" and rows[0]["error"] is None
    with pytest.raises(CollectError, match="sha256 mismatch"):
        collect(tmp_path, {**src, "sha256": ["0" * 64]}, "000-orders.jsonl")
    with pytest.raises(CollectError, match=r"missing.jsonl: download failed: HTTP 404"):
        collect(tmp_path, {**src, "urls": [f"{base}/missing.jsonl"], "sha256": []}, "000-missing.jsonl")


def test_hf_source_goes_through_load_dataset(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    src = {
        "name": "hub",
        "kind": "hf",
        "path": "json",
        "config_name": None,
        "revision": "main",
        "split": "train",
        "data_files": str(f),
        "format": "auto",
        "columns": {},
    }
    rows = collect(tmp_path, src, "train")
    assert rows[0]["format"] == "alpaca" and rows[0]["file"] == "hf://json@main/train"
    with pytest.raises(CollectError, match="hf source 'hub': load_dataset"):
        collect(tmp_path, {**src, "path": "no-such-org/no-such-dataset", "data_files": None}, "train")


def test_synthetic_is_deterministic_and_messy():
    from kiln.synthetic import generate

    a, b = generate(400, seed=3, mess_rate=0.3), generate(400, seed=3, mess_rate=0.3)
    assert a == b and generate(400, seed=4, mess_rate=0.3) != a
    answers = [r["messages"][-1]["content"] for r in a]
    assert any(not x.strip() for x in answers)  # empty answers
    assert sum(1 for x in answers if x.strip()) > 300
    assert len({json.dumps(r) for r in a}) < 400  # duplicates
    assert any("&amp;" in r["messages"][1]["content"] for r in a)


# ---- downloads with limits (issue 12, finding 4) ----------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /drip (a byte every 0.2 s), /big (announces 10 MB), /stream (no length, 200 KB),
    /redirect.parquet (to /data.parquet), /data.parquet."""

    body = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/drip":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10_000_000))
            self.end_headers()
        elif self.path == "/stream":
            self.send_response(200)
            self.end_headers()
            for _ in range(200):
                self.wfile.write(b"y" * 1000)
        elif self.path == "/redirect.parquet":
            self.send_response(302)
            self.send_header("Location", "/data.parquet")
            self.end_headers()
        elif self.path == "/data.parquet":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture
def tricky_server(tmp_path):
    table = pa.Table.from_pylist([CHAT])
    pq.write_table(table, tmp_path / "src.parquet")
    handler = type("H", (_Handler,), {"body": (tmp_path / "src.parquet").read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.body
    server.shutdown()


def test_downloads_have_a_size_limit_and_a_deadline(tmp_path, tricky_server):
    from kiln.sources import download

    base, _ = tricky_server
    with pytest.raises(CollectError, match=r"/big: 10000000 bytes announced, over max_bytes 1000000"):
        download(f"{base}/big", tmp_path / "a", None, 5, max_bytes=1_000_000)
    with pytest.raises(CollectError, match=r"/stream: more than max_bytes 50000 bytes; download stopped"):
        download(f"{base}/stream", tmp_path / "b", None, 5, max_bytes=50_000)
    # A server dripping a byte every 0.2 s never trips the per-read timeout; the deadline cuts it off.
    t0 = time.monotonic()
    with pytest.raises(CollectError, match=r"/drip: not finished within deadline_s 1 s"):
        download(f"{base}/drip", tmp_path / "c", None, 5, deadline_s=1)
    assert time.monotonic() - t0 < 4
    assert not list(tmp_path.glob("*.part"))  # nothing half-written is left behind


def test_a_redirected_parquet_download_is_recorded_and_kept_apart_from_the_raw_shard(tmp_path, tricky_server):
    base, body = tricky_server
    sha = hashlib.sha256(body).hexdigest()
    # A URL ending in .parquet: its shard's raw output is 000-redirect.parquet.parquet, the name the
    # kept original bytes used to take (and were overwritten by).
    raw = tmp_path / "data" / "d" / "raw" / "web" / "000-redirect.parquet.parquet"
    src = SourceSpec(name="web", kind="url", urls=[f"{base}/redirect.parquet"], sha256=[sha])
    stats = collect_shard(src, "000-redirect.parquet", raw)
    rec = stats["download"]
    assert rec["final_url"] == f"{base}/data.parquet" and rec["redirected"] is True
    assert rec["bytes"] == len(body) and rec["sha256"] == sha and rec["verified"] is True
    kept = Path(rec["kept_as"])
    assert kept.parent == tmp_path / "data" / "d" / "downloads" / "web" and kept.read_bytes() == body
    assert pq.read_table(raw).num_rows == 1  # the raw shard did not overwrite the original bytes
    from kiln.tables import download_record

    assert download_record(raw)["final_url"] == rec["final_url"]  # rides to the stats and manifest


def test_an_https_to_http_redirect_is_refused():
    import urllib.request

    from kiln.sources import _NoDowngrade

    req = urllib.request.Request("https://example.org/data.jsonl")
    with pytest.raises(CollectError, match="refused a redirect from https to http"):
        _NoDowngrade().redirect_request(req, None, 302, "Found", {}, "http://example.org/data.jsonl")


def test_a_url_without_a_sha256_is_a_config_error_unless_allowed():
    import copy

    import yaml
    from conftest import REPO

    from kiln.config import ConfigError, validate

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["orders"]["sources"].append({"name": "web", "kind": "url", "urls": ["https://x.org/a.jsonl"]})
    with pytest.raises(ConfigError, match=r"sources\[1\].sha256: no hash for https://x.org/a.jsonl.*kiln url-hash"):
        validate(copy.deepcopy(cfg))
    cfg["datasets"]["orders"]["sources"][1]["allow_unverified"] = True
    validate(cfg)


def test_the_download_record_reaches_the_shard_stats_through_the_workflow(workflow_factory, http_server):
    from conftest import tiny_config

    root, base = http_server
    body = "".join(json.dumps(CHAT).replace("yo", f"yo {i}") + "\n" for i in range(30)).encode()
    (root / "orders.jsonl").write_bytes(body)
    cfg = tiny_config()
    sha = hashlib.sha256(body).hexdigest()
    source = {"name": "web", "kind": "url", "urls": [f"{base}/orders.jsonl"], "sha256": [sha]}
    cfg["datasets"]["orders"]["sources"] = [source]
    wf = workflow_factory(cfg)
    wf.run("results/data/orders/stats/web/000-orders.jsonl.json")
    stats = json.loads(wf.path("data/orders/stats/web/000-orders.jsonl.json").read_text())
    assert stats["download"]["sha256"] == sha and stats["download"]["bytes"] == len(body)
    assert stats["download"]["final_url"] == f"{base}/orders.jsonl" and stats["download"]["verified"]
    assert wf.path("data/orders/downloads/web/000-orders.jsonl.original.jsonl").read_bytes() == body


def _chat_lines(n: int) -> str:
    return "".join(json.dumps(CHAT).replace("yo", f"yo {i}") + "\n" for i in range(n))


def test_a_utf8_byte_order_mark_costs_no_record(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + _chat_lines(3).encode())
    rows = collect(tmp_path, local_source(tmp_path / "*.jsonl"), "bom.jsonl")
    assert [r["error"] for r in rows] == [None, None, None]
    assert "\ufeff" not in rows[0]["raw"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_utf16_jsonl_is_read_whole_with_the_default_or_its_own_encoding(tmp_path, encoding):
    (tmp_path / "wide.jsonl").write_bytes(_chat_lines(4).replace("yo 3", "yö 3").encode("utf-16"))
    rows = collect(tmp_path, local_source(tmp_path / "*.jsonl", encoding=encoding), "wide.jsonl")
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    assert rows[3]["messages"][1]["content"] == "yö 3"


def test_a_latin1_line_names_the_encoding_setting(tmp_path):
    lines = _chat_lines(2) + json.dumps(CHAT, ensure_ascii=False).replace("yo", "café").encode("latin-1").decode(
        "latin-1"
    )
    (tmp_path / "l.jsonl").write_bytes(lines.encode("latin-1"))
    rows = collect(tmp_path, local_source(tmp_path / "*.jsonl"), "l.jsonl")
    assert rows[2]["error"].startswith("not valid utf-8 at byte")
    assert "set `encoding:` on the source" in rows[2]["error"]


def test_a_columns_mapping_naming_an_absent_column_says_which(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")
    src = local_source(tmp_path / "*.csv", columns={"prompt": "question", "completion": "anwser"})
    with pytest.raises(CollectError) as err:
        collect(tmp_path, src, "qa.csv")
    assert "maps completion to column 'anwser', which is not in the file (its columns: answer, question)" in str(
        err.value
    )


@pytest.mark.parametrize("name, content", [("head.csv", b"text\n"), ("blank.jsonl", b"\n\n")])
def test_a_file_without_rows_is_a_file_problem_whatever_its_type(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CollectError, match="no rows"):
        collect(tmp_path, local_source(tmp_path / "*"), name)


def test_on_bad_file_skip_sets_a_file_aside_with_its_reason(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"text\ncaf\xe9\n")
    src = local_source(tmp_path / "*.csv", on_bad_file="skip")
    out = tmp_path / "raw.parquet"
    stats = collect_shard(SourceSpec.from_config(src), "bad.csv", out)
    assert pq.read_table(out).num_rows == 0
    assert stats["skipped"]["file"] == str(tmp_path / "bad.csv")
    assert "not valid utf-8 at line 2" in stats["skipped"]["reason"]
    with pytest.raises(CollectError):  # the default stops
        collect_shard(SourceSpec.from_config(local_source(tmp_path / "*.csv")), "bad.csv", out)


def test_a_skipped_file_reaches_the_dataset_stats_and_page(workflow_factory, tmp_path):
    from conftest import tiny_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "good.jsonl").write_text(_chat_lines(40).replace('"hi"', '"hello, what is in my order?"'))
    (data / "broken.jsonl").write_bytes(b"")
    cfg = tiny_config()
    cfg["datasets"]["orders"]["sources"] = [local_source(data / "*.jsonl", on_bad_file="skip")]
    cfg["datasets"]["orders"]["clean"].pop("answer_schema")
    wf = workflow_factory(cfg)
    wf.run("results/data/orders/report/data_stats.html")
    page = wf.path("data/orders/report/data_stats.html").read_text()
    assert "Files set aside (on_bad_file: skip)" in page and "broken.jsonl" in page and "file is empty" in page


def test_a_failed_collect_says_kilns_reason_on_the_console(workflow_factory, tmp_path):
    from conftest import tiny_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text(json.dumps({"question": "what is in my order?", "answer": "two apples"}) + "\n")
    cfg = tiny_config()
    cfg["datasets"]["orders"]["sources"] = [
        local_source(data / "*.jsonl", columns={"prompt": "question", "completion": "dat"})
    ]
    proc = workflow_factory(cfg).run("results/data/orders/raw/in/qa.jsonl.parquet", check=False)
    assert proc.returncode != 0
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("Kiln: rule collect failed:"))
    assert f"{data / 'qa.jsonl'}: `columns:` maps completion to column 'dat', which is not in the file" in line
    assert "(details: results/logs/collect/" in line
