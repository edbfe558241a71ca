"""Preference records (issue 27): what the canonical turns of a pair mean, for clean and build.

(kiln.records.preference_turns / unpaired_turns map TRL's formats onto them.) A pair (kind
``preference``) is its prompt's turns followed by a ``chosen`` and a ``rejected`` turn;
an unpaired example (kind ``unpaired``, KTO) is the prompt's turns followed by one ``chosen``
(desirable, ``label: true``) or ``rejected`` (``label: false``) turn. Kept as turns in the one
``messages`` column, a pair goes through clean (both answers normalised like any turn), the content
hash and dedup (both answers count), lineage and the rest of the data stages unchanged; this module
says what the extra roles mean.

Formats read (TRL's dataset-formats page):
- ``prompt`` / ``chosen`` / ``rejected``: strings (standard) or turn lists (conversational: the
  prompt's turns, then one assistant turn each for chosen and rejected);
- ``messages`` (the shared conversation so far) / ``chosen`` / ``rejected``: the same with the prompt
  given as a ``messages`` prefix;
- ``chosen`` / ``rejected`` as whole conversations that share every turn but the last (TRL's implicit
  prompt);
- ``prompt`` / ``completion`` / ``label`` (KTO's unpaired preference).
"""

from __future__ import annotations

ANSWER_ROLES = ("chosen", "rejected")
PREFERENCE_KINDS = ("preference", "unpaired")


def split_prompt(turns: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """A canonical preference row's prompt turns and its answers by role."""
    prompt = [t for t in turns if t["role"] not in ANSWER_ROLES]
    return prompt, {t["role"]: t["content"] for t in turns if t["role"] in ANSWER_ROLES}


def answers_by_role(parent, roles, content, n: int) -> dict:
    """Per row of a cleaned shard: the chosen and the rejected answer's text (None where the row has
    none), from its flattened turns (``parent`` the row of each turn)."""
    import numpy as np
    import pyarrow.compute as pc

    out = {}
    for role in ANSWER_ROLES:
        at = np.flatnonzero(pc.equal(roles, role).to_numpy(zero_copy_only=False)) if len(roles) else []
        texts = np.full(n, None, dtype=object)
        texts[parent[at]] = content.take(at).to_numpy(zero_copy_only=False) if len(at) else []
        out[role] = texts
    return out


def check_pairs(shard, v) -> None:
    """The clean stage's structure checks for preference rows (kiln.clean._check_structure runs it):
    a prompt with a user turn, no empty answer, and a pair whose answers differ."""
    import numpy as np

    pref, unpaired = shard.kind == "preference", shard.kind == "unpaired"
    either = pref | unpaired
    chosen, rejected = shard.answers["chosen"], shard.answers["rejected"]
    empty_c = np.array([not c for c in chosen], dtype=bool)
    empty_r = np.array([not r for r in rejected], dtype=bool)
    v.reject(either & (shard.n_user == 0), "missing_field", "no user turn in the prompt")
    v.reject(pref & empty_c, "empty_answer", "the chosen answer is empty after cleaning")
    v.reject(pref & empty_r, "empty_answer", "the rejected answer is empty after cleaning")
    v.reject(unpaired & empty_c & empty_r, "empty_answer", "the completion is empty after cleaning")
    same = np.array([c is not None and c == r for c, r in zip(chosen, rejected)], dtype=bool)
    v.reject(pref & same, "identical_answers", "chosen and rejected are the same text after cleaning")


def split_keys(table) -> list[str]:
    """What a built row's split is drawn from: its id, or for a preference row a hash of its prompt
    alone, so every pair on one prompt lands in one split (no prompt in train and test)."""
    from kiln.records import stable_id

    ids, kinds = table.column("kiln_id").to_pylist(), table.column("kind").to_pylist()
    if not any(k in PREFERENCE_KINDS for k in kinds):
        return ids
    messages = table.column("messages").to_pylist()
    return [
        stable_id("prompt", split_prompt(turns)[0]) if kind in PREFERENCE_KINDS else kiln_id
        for kiln_id, kind, turns in zip(ids, kinds, messages, strict=True)
    ]
