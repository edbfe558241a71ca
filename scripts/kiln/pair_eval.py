"""Held-out preference pairs scored for base, SFT and preference-tuned models (issue 27).

For each pair, a model's log-probability of the chosen and of the rejected answer given the prompt
(summed over the answer's tokens: the ids training saw, from the tokenize stage). Reported per model:

- ``preference_accuracy``: share of pairs whose chosen answer is the more likely one;
- ``mean_logp_margin``: mean of log p(chosen) - log p(rejected), in nats;

and for the tuned model against its reference (the SFT model), DPO's implicit reward
``beta * (log p - log p_ref)``: ``reward_accuracy`` (share of pairs whose chosen answer's reward is
the higher, TRL's ``rewards/accuracies``) and ``mean_reward_margin`` (TRL's ``rewards/margins``).

KTO's unpaired rows (one answer, desirable or not) have no pair to compare: the ``unpaired`` block
scores the tuned model's implicit reward of each answer against its label (``label_accuracy``: share
of desirable answers whose reward is above 0 and undesirable ones below) and the mean reward of each
kind.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)
PAIR_MODELS = ("base", "sft", "tuned")


def pair_log_probs(model, rows, pad_id: int, max_len: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed answer log-probabilities (chosen, rejected) of each pair, each sequence cut to max_len
    as training cut it (its start kept)."""
    import torch

    device = next(model.parameters()).device
    seqs, spans, absent = [], [], []
    for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True):
        for answer in (c, r):
            if not answer:  # an unpaired row's other answer: nothing to score (NaN)
                absent.append(len(seqs))
                answer = []
            ids = (list(p) + list(answer))[:max_len]
            seqs.append(ids)
            spans.append((len(p), len(ids)))
    out = np.zeros(len(seqs), dtype=np.float64)
    out[absent] = np.nan
    skip = set(absent)
    order = [i for i in np.argsort([len(s) for s in seqs]) if i not in skip]  # like lengths together
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[j, : len(seqs[i])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        for j, i in enumerate(idx):
            a, b = spans[i]
            out[i] = float(logp[j, a - 1 : b - 1].sum())
    return out[0::2], out[1::2]


def preference_scores(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    margin = chosen - rejected
    return {
        "pairs": int(len(margin)),
        # None where the test split holds no pair (a kto dataset of unpaired rows only)
        "preference_accuracy": float(np.mean(margin > 0)) if len(margin) else None,
        "mean_logp_margin": float(np.mean(margin)) if len(margin) else None,
    }


def reward_scores(policy: tuple, reference: tuple, beta: float) -> dict:
    """DPO's implicit reward of the policy against the reference, as TRL logs it."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    return {
        "beta": beta,
        "reward_accuracy": float(np.mean(chosen > rejected)) if len(chosen) else None,
        "mean_reward_margin": float(np.mean(chosen - rejected)) if len(chosen) else None,
        "mean_chosen_reward": float(np.mean(chosen)) if len(chosen) else None,
        "mean_rejected_reward": float(np.mean(rejected)) if len(chosen) else None,
    }


def unpaired_scores(policy: tuple, reference: tuple, beta: float) -> dict:
    """KTO's implicit reward of each unpaired answer against its label (desirable: the chosen side)."""
    desirable = beta * (policy[0] - reference[0])
    desirable = desirable[~np.isnan(desirable)]
    undesirable = beta * (policy[1] - reference[1])
    undesirable = undesirable[~np.isnan(undesirable)]
    n = len(desirable) + len(undesirable)
    return {
        "rows": n,
        "desirable": len(desirable),
        "undesirable": len(undesirable),
        "label_accuracy": float((np.sum(desirable > 0) + np.sum(undesirable < 0)) / n) if n else 0.0,
        "mean_desirable_reward": float(np.mean(desirable)) if len(desirable) else None,
        "mean_undesirable_reward": float(np.mean(undesirable)) if len(undesirable) else None,
    }


def _take(logps: tuple, mask: np.ndarray) -> tuple:
    return tuple(x[mask] for x in logps)


def score_pairs(
    load, pairs_dir: str, pad_id: int, max_len: int, beta: float | None, max_pairs: int | None = None
) -> dict:
    """The preference block of metrics.json: ``load(kind)`` gives each of PAIR_MODELS (base, the SFT
    model it started from, the tuned one); every held-out pair of the test split is scored (at most
    ``max_pairs``). ``beta``: the implicit reward's, for a method trained against the SFT model as
    its reference (dpo, kto); None for one with no reference (orpo): no reward is reported."""
    import datasets

    test = datasets.load_from_disk(pairs_dir)["test"]
    if max_pairs is not None:
        test = test.select(range(min(max_pairs, len(test))))
    if not len(test):
        raise ValueError(f"{pairs_dir}: the test split holds no pairs (raise build.test of the pairs dataset)")
    rows = test.to_dict()
    paired = np.array([bool(c) and bool(r) for c, r in zip(rows["chosen_ids"], rows["rejected_ids"], strict=True)])
    block: dict = {"split": "test", "pairs": int(paired.sum())}
    logps = {}
    for kind in PAIR_MODELS:
        t0 = time.perf_counter()
        model = load(kind)
        logps[kind] = pair_log_probs(model, rows, pad_id, max_len)
        del model
        scores = preference_scores(*_take(logps[kind], paired))
        block[kind] = {**scores, "eval_seconds": round(time.perf_counter() - t0, 1)}
        log.info("pairs, %s: accuracy %s", kind, block[kind]["preference_accuracy"])
    if beta is not None:
        block["tuned"].update(reward_scores(_take(logps["tuned"], paired), _take(logps["sft"], paired), beta))
    if beta is not None and not paired.all():
        block["unpaired"] = unpaired_scores(_take(logps["tuned"], ~paired), _take(logps["sft"], ~paired), beta)
    block["delta_tuned_minus_sft"] = {
        k: block["tuned"][k] - block["sft"][k] if block["pairs"] else None
        for k in ("preference_accuracy", "mean_logp_margin")
    }
    return block
