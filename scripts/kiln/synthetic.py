"""The default task's data: order messages whose answer is one exact JSON object.

Deterministic for a seed. A share of rows (``mess_rate``) carries the defects real data has, so the
cleaning stage has real work: duplicates, near duplicates, empty answers, HTML entities, control
characters, over-long records, broken JSON and wrong field types.
"""

from __future__ import annotations

import datetime as dt
import json
import random

INSTRUCTION = "Extract the order as JSON with the keys customer, product, quantity, unit_price, city, date."
# The answer's fields and their types, as `clean.answer_schema` checks them.
ANSWER_SCHEMA = {
    "customer": "string",
    "product": "string",
    "quantity": "integer",
    "unit_price": "number",
    "city": "string",
    "date": "date",
}
ANSWER_KEYS = tuple(ANSWER_SCHEMA)

FIRST = [
    "Maria",
    "John",
    "Aisha",
    "Wei",
    "Lucas",
    "Sofia",
    "Omar",
    "Emma",
    "Ravi",
    "Chloe",
    "Mateo",
    "Hannah",
    "Kenji",
    "Fatima",
    "Noah",
    "Olga",
    "Diego",
    "Priya",
    "Liam",
    "Zoe",
    "Tomasz",
    "Ingrid",
    "Kwame",
    "Lena",
    "Arjun",
    "Camille",
    "Yusuf",
    "Elena",
    "Samuel",
    "Mei",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Zhang",
    "Martin",
    "Rossi",
    "Haddad",
    "Brown",
    "Patel",
    "Dubois",
    "Garcia",
    "Schmidt",
    "Tanaka",
    "Ali",
    "Wilson",
    "Ivanova",
    "Fernandez",
    "Nair",
    "Murphy",
    "Novak",
    "Kowalski",
    "Berg",
    "Mensah",
    "Weber",
    "Gupta",
    "Laurent",
    "Demir",
    "Popescu",
    "Okafor",
    "Chen",
]
PRODUCTS = [
    "desk lamp",
    "office chair",
    "standing desk",
    "coffee grinder",
    "wireless mouse",
    "mechanical keyboard",
    "water bottle",
    "yoga mat",
    "backpack",
    "monitor arm",
    "USB-C cable",
    "notebook",
    "phone case",
    "bluetooth speaker",
    "air purifier",
    "kettle",
    "frying pan",
    "desk organizer",
    "webcam",
    "headphones",
    "tea set",
    "plant pot",
    "bike light",
    "rain jacket",
    "travel mug",
]
CITIES = [
    "Lyon",
    "Berlin",
    "Austin",
    "Osaka",
    "Toronto",
    "Lagos",
    "Madrid",
    "Pune",
    "Oslo",
    "Krakow",
    "Melbourne",
    "Nairobi",
    "Dublin",
    "Seoul",
    "Porto",
    "Denver",
    "Milan",
    "Accra",
    "Vienna",
    "Lima",
]
TEMPLATES = [
    "Hi, this is {customer}. Please send {quantity} x {product} at {price} each to {city}. I need them by {date}.",
    "Order from {customer}: {quantity} {product} ({price} per unit), deliver to {city} on {date}.",
    "{customer} here! Could I get {quantity} of the {product}? Price was {price}. Ship to {city}, date {date}.",
    "New order - customer: {customer}; item: {product}; qty: {quantity}; unit price: {price}; "
    "destination: {city}; delivery: {date}",
    "Hello team, {customer} would like to buy {quantity} {product} for {price} apiece. "
    "Delivery address is in {city}. Date: {date}. Thanks!",
    "Can you book {quantity} units of {product} for {customer}? Quoted {price} each, "
    "to be delivered in {city} on {date}.",
    "Purchase request ({date}): {customer} in {city} orders {quantity} x {product}, {price}/unit.",
    "Dear sales, please process an order of {quantity} {product} at a price of {price} per item "
    "for {customer}, shipping to {city} by {date}. Regards",
    "{quantity} {product} for {customer} - {city} - {date} - {price} each",
    "Good morning! {customer} from {city} confirms {quantity} x {product} at {price}. Please deliver on {date}.",
]
FILLER = (
    "Also, a note about our previous conversation regarding the warehouse schedule, the "
    "invoices from last quarter and the general state of the logistics arrangements. "
)


def _order(rng: random.Random) -> dict:
    start = dt.date(2025, 1, 1)
    return {
        "customer": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "product": rng.choice(PRODUCTS),
        "quantity": rng.randint(1, 60),
        "unit_price": round(rng.randint(100, 50000) / 100, 2),
        "city": rng.choice(CITIES),
        "date": (start + dt.timedelta(days=rng.randint(0, 700))).isoformat(),
    }


def _message(rng: random.Random, order: dict) -> str:
    price = json.dumps(order["unit_price"])  # as the answer will write it
    template = rng.choice(TEMPLATES)
    return template.format(price=price, **{k: v for k, v in order.items() if k != "unit_price"})


def _record(user: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def answer_json(order: dict) -> str:
    return json.dumps({k: order[k] for k in ANSWER_KEYS}, ensure_ascii=False)


MESS_KINDS = (
    "duplicate",
    "near_duplicate",
    "empty_answer",
    "html_entities",
    "control_chars",
    "too_long",
    "broken_json",
    "wrong_type",
)


def generate(rows: int, seed: int = 0, mess_rate: float = 0.1) -> list[dict]:
    """``rows`` records in OpenAI ``messages`` form; the same arguments give the same records."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < rows:
        order = _order(rng)
        user, answer = _message(rng, order), answer_json(order)
        if out and rng.random() < mess_rate:
            mess = rng.choice(MESS_KINDS)
            if mess == "duplicate":
                out.append(json.loads(json.dumps(rng.choice(out))))
                continue
            if mess == "near_duplicate":
                prev = json.loads(json.dumps(rng.choice(out)))
                prev["messages"][1]["content"] = prev["messages"][1]["content"].replace(". ", ".  ", 1) + " "
                out.append(prev)
                continue
            if mess == "empty_answer":
                answer = rng.choice(["", "   ", "\n"])
            elif mess == "html_entities":
                user = user.replace(" - ", " &ndash; ").replace("'", "&#39;") + " &amp; thanks"
            elif mess == "control_chars":
                cut = rng.randrange(len(user))
                user = user[:cut] + rng.choice(["\x00", "\x07", "\x1b", "\x0c"]) + user[cut:]
            elif mess == "too_long":
                user = user + " " + FILLER * 60
            elif mess == "broken_json":
                answer = answer[: rng.randint(5, len(answer) - 2)]
            elif mess == "wrong_type":
                bad = dict(order)
                bad["quantity"] = str(order["quantity"]) + " pcs"
                answer = answer_json(bad)
        out.append(_record(user, answer))
    return out
