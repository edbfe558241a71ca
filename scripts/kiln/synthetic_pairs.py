"""Preference pairs for the default order task (issue 27's shipped example): the chosen answer is the
exact JSON object; the rejected one a failure an extraction model really makes.

Half the pairs are on messages written the way the SFT data never writes them — the date as
"March 17, 2025" or "17.03.2025", the quantity as a word ("a dozen"), the price with its currency
sign — and their rejected answer copies that surface form into the JSON (what a model that learned
to copy from ISO-dated messages does). The other half are on the SFT data's own message templates,
with one failure each, drawn evenly: a wrong value (a quantity or price misread, another city or
customer), a missing field, the date in another format, prose around the JSON, a number written as
a string, a key renamed. Every chosen answer passes the default ``answer_schema``; every rejected
answer differs from it. Deterministic for a seed; the orders come from kiln.synthetic's generator
(another seed than the SFT dataset's).
"""

from __future__ import annotations

import datetime as dt
import json
import random

from kiln.synthetic import ANSWER_KEYS, CITIES, FIRST, INSTRUCTION, LAST, TEMPLATES, _message, _order, answer_json

# Surface forms of a message the SFT data never has, and the rejected answer that copies them.
SURFACES = ("date_words", "date_dotted", "quantity_word", "price_currency")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven", 12: "a dozen", 20: "twenty", 24: "two dozen"}  # fmt: skip
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


def surface_pair(order: dict, surface: str, rng: random.Random) -> tuple[str, str]:
    """(the message written with ``surface``, the rejected answer that copies it)."""
    shown = {k: v for k, v in order.items() if k != "unit_price"}
    price, copied = json.dumps(order["unit_price"]), {k: order[k] for k in ANSWER_KEYS}
    day = dt.date.fromisoformat(order["date"])
    if surface == "date_words":
        shown["date"] = copied["date"] = rng.choice([day.strftime("%B %-d, %Y"), day.strftime("%-d %B %Y")])
    elif surface == "date_dotted":
        shown["date"] = copied["date"] = day.strftime("%d.%m.%Y")
    elif surface == "quantity_word":
        order["quantity"] = rng.choice(sorted(NUMBER_WORDS))
        shown["quantity"] = copied["quantity"] = NUMBER_WORDS[order["quantity"]]
    elif surface == "price_currency":
        price = copied["unit_price"] = rng.choice(["$", "€", "£"]) + f"{order['unit_price']:.2f}"
    return rng.choice(TEMPLATES).format(price=price, **shown), _dumps(copied)


def generate_pairs(rows: int, seed: int = 0) -> list[dict]:
    """``rows`` pairs in TRL's conversational prompt / chosen / rejected form."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        order = _order(rng)
        while order["customer"].split(" ", 1)[1] not in LAST:  # a two-part name (wrong_customer splits it)
            order = _order(rng)
        if i % 2:
            failure = FAILURES[(i // 2) % len(FAILURES)]
            message, rejected = _message(rng, order), rejected_answer(order, failure, rng)
        else:
            failure = SURFACES[(i // 2) % len(SURFACES)]
            message, rejected = surface_pair(order, failure, rng)
        out.append(
            {
                "prompt": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": message}],
                "chosen": [{"role": "assistant", "content": answer_json(order)}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "failure": failure,
            }
        )
    return out
