"""Preference pairs for the default order task (issue 27's shipped example): the chosen answer is the
exact JSON object; the rejected one a failure an extraction model really makes.

Failures, one per pair, drawn evenly: a wrong value (a quantity or price misread, the wrong city or
customer from the same message's neighbours), a missing field, the date in another format, prose
around the JSON, a number written as a string, the field order changed and a key renamed. Every
chosen answer passes the default ``answer_schema``; every rejected answer differs from it.
Deterministic for a seed; its orders come from kiln.synthetic's own generator with another seed than
the SFT dataset's.
"""

from __future__ import annotations

import datetime as dt
import json
import random

from kiln.synthetic import ANSWER_KEYS, CITIES, FIRST, INSTRUCTION, LAST, _message, _order, answer_json

FAILURES = (
    "wrong_quantity",
    "wrong_price",
    "wrong_city",
    "wrong_customer",
    "missing_field",
    "date_format",
    "prose_around",
    "number_as_string",
    "renamed_key",
)


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def rejected_answer(order: dict, failure: str, rng: random.Random) -> str:
    """One realistic wrong answer to ``order`` of the kind ``failure``."""
    bad = {k: order[k] for k in ANSWER_KEYS}
    if failure == "wrong_quantity":
        bad["quantity"] = (
            order["quantity"] + rng.choice([-2, -1, 1, 10]) if order["quantity"] > 2 else order["quantity"] + 1
        )
    elif failure == "wrong_price":
        bad["unit_price"] = round(order["unit_price"] * rng.choice([10, 0.1, 1.1]), 2) or 0.5
    elif failure == "wrong_city":
        bad["city"] = rng.choice([c for c in CITIES if c != order["city"]])
    elif failure == "wrong_customer":
        first, last = order["customer"].split(" ", 1)
        bad["customer"] = rng.choice([first, f"{rng.choice([f for f in FIRST if f != first])} {last}"])
    elif failure == "missing_field":
        bad.pop(rng.choice(["city", "date", "unit_price", "customer"]))
    elif failure == "date_format":
        day = dt.date.fromisoformat(order["date"])
        bad["date"] = rng.choice([day.strftime("%m/%d/%Y"), day.strftime("%d.%m.%Y"), day.strftime("%B %d, %Y")])
    elif failure == "prose_around":
        lead = rng.choice(["Here is the order as JSON:\n", "Sure! The extracted order is ", "```json\n"])
        tail = {"```json\n": "\n```"}.get(lead, rng.choice(["", "\nLet me know if you need anything else."]))
        return lead + answer_json(order) + tail
    elif failure == "number_as_string":
        key = rng.choice(["quantity", "unit_price"])
        bad[key] = f"{order[key]}" if key == "quantity" else f"${order[key]:.2f}"
    elif failure == "renamed_key":
        key, new = rng.choice([("customer", "name"), ("unit_price", "price"), ("quantity", "qty")])
        bad = {(new if k == key else k): v for k, v in bad.items()}
    return _dumps(bad)


def generate_pairs(rows: int, seed: int = 0) -> list[dict]:
    """``rows`` pairs in TRL's conversational prompt / chosen / rejected form."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        order = _order(rng)
        while order["customer"].split(" ", 1)[1] not in LAST:  # a two-part name (wrong_customer splits it)
            order = _order(rng)
        prompt = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": _message(rng, order)}]
        failure = FAILURES[i % len(FAILURES)]
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer_json(order)}],
                "rejected": [{"role": "assistant", "content": rejected_answer(order, failure, rng)}],
                "failure": failure,
            }
        )
    return out
