import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.clean import CleanError, clean_table
from kiln.records import stable_id
from kiln.spec import CleanSettings
from kiln.synthetic import ANSWER_SCHEMA, generate
from kiln.tables import RAW_SCHEMA

SCHEMA = ANSWER_SCHEMA


def raw_table(records, errors=None):
    rows = []
    for i, rec in enumerate(records):
        err = (errors or {}).get(i)
        turns = None if err else rec
        kind = None if err else ("text" if turns[0]["role"] == "text" else "chat")
        rows.append(
            {
                "kiln_id": stable_id(kind, turns, str(i)),
                "source": "s",
                "file": "f",
                "row": i + 1,
                "format": "messages",
                "kind": kind,
                "messages": turns,
                "raw": json.dumps(rec),
                "error": err,
            }
        )
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def chat(user, answer, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]


def test_text_operations():
    table = raw_table(
        [
            chat("  Tom &amp; Jerry\x07 say\t\thi  \r\n\n\n\nbye ", "ok"),
            chat("Cafe\u0301 mail me at a.b@example.com or +1 (555) 010-9999", "fine"),
        ]
    )
    clean, rejected, stats = clean_table(table, CleanSettings(mask_pii=True))
    assert rejected.num_rows == 0
    turns = clean.column("messages").to_pylist()
    assert turns[0][0]["content"] == "Tom & Jerry say hi\n\nbye"
    assert turns[1][0]["content"] == "Café mail me at [EMAIL] or [PHONE]"
    assert stats["rows_edited_by"] == {"unicode": 1, "html": 1, "control": 1, "whitespace": 1, "pii": 1}
    assert clean.column("edits").to_pylist() == ["html,control,whitespace", "unicode,pii"]


def test_every_reason():
    good = json.dumps(
        {"customer": "A", "product": "b", "quantity": 1, "unit_price": 2.5, "city": "c", "date": "2025-01-02"}
    )
    records = [
        chat("order one please", good),  # kept
        chat("order one please", good),  # duplicate
        chat("order two please", "   "),  # empty answer
        [{"role": "assistant", "content": good}],  # no user turn
        chat("x", good[:5]),  # too short
        chat("order three " * 50, good),  # too long
        chat("order four please", good[:-3]),  # invalid json
        chat("order five please", good.replace('"quantity": 1', '"quantity": "1"')),  # schema
        chat("order six please SECRET", good),  # drop pattern
        [{"role": "user", "content": "unparsable"}],  # read error
    ]
    table = raw_table(records, errors={9: "malformed JSON at column 2: x"})
    clean, rejected, stats = clean_table(
        table, CleanSettings(min_chars=20, max_chars=400, answer_schema=SCHEMA, drop_patterns=["SECRET"])
    )
    reasons = dict(zip(rejected.column("row").to_pylist(), rejected.column("reason").to_pylist(), strict=True))
    assert reasons == {
        2: "duplicate",
        3: "empty_answer",
        4: "missing_field",
        5: "too_short",
        6: "too_long",
        7: "invalid_json",
        8: "answer_schema",
        9: "drop_pattern",
        10: "unreadable",
    }
    details = dict(zip(rejected.column("row").to_pylist(), rejected.column("detail").to_pylist(), strict=True))
    assert "field 'quantity': expected integer, got str '1'" in details[8]
    assert "same content as row 1" in details[2]
    assert details[10] == "malformed JSON at column 2: x"
    assert clean.num_rows == 1 and stats["rows_in"] == 10


def test_query_filter_and_a_bad_query_is_a_clear_error():
    table = raw_table([chat("a b c d e", "ok"), chat("a", "ok"), chat("a b", "ok")])
    clean, rejected, _ = clean_table(table, CleanSettings(query="n_chars > 4"))
    assert clean.num_rows == 2 and rejected.column("reason").to_pylist() == ["query"]
    with pytest.raises(CleanError, match="clean.query: 'nope > 1': 'nope' is not a column.*columns available"):
        clean_table(table, CleanSettings(query="nope > 1"))


messy_text = st.text(alphabet=st.sampled_from(list('ab &;#\t\n\x00\x07 é<>{}":1')), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messy_text, messy_text, st.booleans()), min_size=0, max_size=25), st.integers(0, 20))
def test_raw_rows_equal_clean_plus_rejected(rows, min_chars):
    records = [chat(u, a) if ok else [{"role": "user", "content": u}] for u, a, ok in rows]
    table = raw_table(records)
    clean, rejected, stats = clean_table(table, CleanSettings(min_chars=min_chars, max_chars=40))
    assert clean.num_rows + rejected.num_rows == table.num_rows
    assert sorted(clean.column("row").to_pylist() + rejected.column("row").to_pylist()) == list(
        range(1, table.num_rows + 1)
    )
    assert all(r is not None for r in rejected.column("reason").to_pylist())


def test_synthetic_mess_is_caught():
    recs = [r["messages"] for r in generate(1500, seed=1, mess_rate=0.4)]
    clean, rejected, stats = clean_table(raw_table(recs), CleanSettings(max_chars=4000, answer_schema=SCHEMA))
    found = set(stats["rejected_by_reason"])
    assert {"duplicate", "empty_answer", "too_long", "invalid_json", "answer_schema"} <= found
    for msgs in clean.column("messages").to_pylist():
        assert "&amp;" not in msgs[1]["content"] and "\x07" not in msgs[1]["content"]
        assert json.loads(msgs[-1]["content"])


json_values = st.one_of(
    st.text(max_size=8),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["2025-02-30", "2025-13-01", "2025-1-1"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(SCHEMA) + ["extra"]), json_values, max_size=7), st.booleans())
def test_answer_fast_path_only_accepts_answers_the_exact_check_accepts(obj, ordered):
    from kiln.answers import answer_fast_pattern, check_answer

    if ordered:
        obj = {k: obj[k] for k in SCHEMA if k in obj} | {k: v for k, v in obj.items() if k not in SCHEMA}
    text = json.dumps(obj, ensure_ascii=False)
    if fast_match(answer_fast_pattern(SCHEMA), text):  # with the engine clean_table uses (RE2)
        assert check_answer(text, SCHEMA) is None, text


def test_answer_fast_path_accepts_the_usual_answer():
    from kiln.answers import answer_fast_pattern

    good = {
        "customer": 'Ana "Li"',
        "product": "lamp",
        "quantity": 3,
        "unit_price": 24.5,
        "city": "P",
        "date": "2025-06-01",
    }
    assert fast_match(answer_fast_pattern(SCHEMA), json.dumps(good))
    assert not fast_match(answer_fast_pattern(SCHEMA), json.dumps(good) + "x")


def fast_match(pattern: str, text: str) -> bool:
    import pyarrow.compute as pc

    return pc.match_substring_regex(pa.array([text]), pattern).to_pylist()[0]


def test_pii_masking_leaves_dates_and_numbers_and_never_rejects_a_good_answer():
    schema = {"item": "string", "date": "date", "qty": "integer", "contact": "string"}
    answer = '{"item": "lamp", "date": "2025-06-01", "qty": 12345678, "contact": "+1 (415) 555-2671"}'
    table = raw_table(
        [
            chat("Order 12345678 shipped 2025-06-01; call (415) 555-2671 or write to a@b.example.com", answer),
            chat(
                "Postcode 94105, ref 1234-5678-9012 on 2025-06-01 12:30",
                '{"item": "x", "date": "2025-01-01", "qty": 1, "contact": ""}',
            ),
        ]
    )
    clean, rejected, stats = clean_table(table, CleanSettings(mask_pii=True, answer_schema=schema))
    assert rejected.num_rows == 0, rejected.to_pylist()
    first, second = clean.column("messages").to_pylist()
    assert first[0]["content"] == "Order 12345678 shipped 2025-06-01; call [PHONE] or write to [EMAIL]"
    masked = json.loads(first[1]["content"])  # still JSON, same fields and types
    assert masked == {"item": "lamp", "date": "2025-06-01", "qty": 12345678, "contact": "[PHONE]"}
    assert second[0]["content"] == "Postcode 94105, ref 1234-5678-9012 on 2025-06-01 12:30"
    assert stats["rows_edited_by"]["pii"] == 1


def test_pii_region_reads_local_numbers():
    table = raw_table([chat("call 020 7946 0958 today", "ok")])
    assert (
        "[PHONE]"
        not in clean_table(table, CleanSettings(mask_pii=True))[0].column("messages").to_pylist()[0][0]["content"]
    )
    gb = clean_table(table, CleanSettings(mask_pii=True, pii_region="GB"))[0]
    assert gb.column("messages").to_pylist()[0][0]["content"] == "call [PHONE] today"


ORDER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["product", "quantity", "ship"],
    "additionalProperties": False,
    "properties": {
        "product": {"type": "string", "enum": ["lamp", "desk"]},
        "quantity": {"type": "integer", "minimum": 1},
        "ship": {
            "type": "object",
            "required": ["date"],
            "properties": {"date": {"type": "string", "format": "date"}, "city": {"type": "string"}},
        },
    },
}


@pytest.mark.parametrize(
    "answer, reason, detail",
    [
        ('{"product": "lamp", "quantity": 2, "ship": {"date": "2025-06-01", "city": "Oslo"}}', None, None),
        ('{"product": "lamp", "quantity": 2, "ship": {"date": "2025-06-01"}}', None, None),
        (
            '{"product": "sofa", "quantity": 2, "ship": {"date": "2025-06-01"}}',
            "answer_schema",
            "field 'product': 'sofa' is not one of",
        ),
        (
            '{"product": "lamp", "quantity": 0, "ship": {"date": "2025-06-01"}}',
            "answer_schema",
            "field 'quantity': 0 is less than the minimum of 1",
        ),
        (
            '{"product": "lamp", "quantity": 2, "ship": {"date": "June 1st"}}',
            "answer_schema",
            "field 'ship/date': 'June 1st' is not a 'date'",
        ),
        ('{"product": "lamp", "quantity": 2}', "answer_schema", "the answer: 'ship' is a required property"),
        (
            '{"product": "lamp", "quantity": 2, "ship": {"date": "2025-06-01"}, "x": 1}',
            "answer_schema",
            "Additional properties",
        ),
        ('{"product": "lamp",', "invalid_json", "answer is not valid JSON"),
    ],
)
def test_answer_schema_as_json_schema(answer, reason, detail):
    clean, rejected, _ = clean_table(
        raw_table([chat("an order for a lamp please", answer)]), CleanSettings(answer_schema=ORDER_SCHEMA)
    )
    if reason is None:
        assert clean.num_rows == 1 and rejected.num_rows == 0
    else:
        row = rejected.to_pylist()[0]
        assert row["reason"] == reason and detail in row["detail"], row


def test_an_invalid_json_schema_is_refused_when_the_config_is_read():
    from kiln.config import ConfigError, validate

    cfg = {
        "datasets": {
            "d": {"sources": [{"name": "s", "kind": "synthetic"}], "clean": {"answer_schema": {"type": "objekt"}}}
        },
        "models": {"m": {"kind": "local", "path": "."}},
        "experiments": {"e": {"dataset": "d", "model": "m"}},
    }
    with pytest.raises(
        ConfigError, match=r"clean.answer_schema: not a valid JSON Schema at type: 'objekt' is not valid"
    ):
        validate(cfg)


def test_an_unknown_pii_region_is_refused_not_ignored():
    from kiln.clean import CleanError

    with pytest.raises(CleanError, match="clean.pii_region: 'ZZ' is not a region"):
        clean_table(raw_table([chat("call (415) 555-2671", "ok")]), CleanSettings(mask_pii=True, pii_region="ZZ"))
