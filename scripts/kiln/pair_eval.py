"""Held-out preference pairs scored for base, SFT and preference-tuned models (issue 27).

For each pair, a model's log-probability of the chosen and of the rejected answer given the prompt
(summed over the answer's tokens: the ids training saw, from the tokenize stage). Reported per model:

- ``preference_accuracy``: share of pairs whose chosen answer is the more likely one;
- ``mean_logp_margin``: mean of log p(chosen) - log p(rejected), in nats;

and for the tuned model against its reference (the SFT model), DPO's implicit reward
``beta * (log p - log p_ref)``: ``reward_accuracy`` (share of pairs whose chosen answer's reward is
the higher, TRL's ``rewards/accuracies``) and ``mean_reward_margin`` (TRL's ``rewards/margins``).
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
    seqs, spans = [], []
    for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True):
        for answer in (c, r):
            ids = (list(p) + list(answer))[:max_len]
            seqs.append(ids)
            spans.append((len(p), len(ids)))
    out = np.zeros(len(seqs), dtype=np.float64)
    order = np.argsort([len(s) for s in seqs])  # similar lengths together: less padding
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
        "preference_accuracy": float(np.mean(margin > 0)) if len(margin) else 0.0,
        "mean_logp_margin": float(np.mean(margin)) if len(margin) else 0.0,
    }


def reward_scores(policy: tuple, reference: tuple, beta: float) -> dict:
    """DPO's implicit reward of the policy against the reference, as TRL logs it."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    return {
        "beta": beta,
        "reward_accuracy": float(np.mean(chosen > rejected)) if len(chosen) else 0.0,
        "mean_reward_margin": float(np.mean(chosen - rejected)) if len(chosen) else 0.0,
        "mean_chosen_reward": float(np.mean(chosen)) if len(chosen) else 0.0,
        "mean_rejected_reward": float(np.mean(rejected)) if len(chosen) else 0.0,
    }


def score_pairs(load, pairs_dir: str, pad_id: int, max_len: int, beta: float, max_pairs: int | None = None) -> dict:
    """The preference block of metrics.json: ``load(kind)`` gives each of PAIR_MODELS (base, the SFT
    model it started from, the tuned one); every held-out pair of the test split is scored (at most
    ``max_pairs``)."""
    import datasets

    test = datasets.load_from_disk(pairs_dir)["test"]
    if max_pairs is not None:
        test = test.select(range(min(max_pairs, len(test))))
    if not len(test):
        raise ValueError(f"{pairs_dir}: the test split holds no pairs (raise build.test of the pairs dataset)")
    rows = test.to_dict()
    block: dict = {"split": "test", "pairs": len(test)}
    logps = {}
    for kind in PAIR_MODELS:
        t0 = time.perf_counter()
        model = load(kind)
        logps[kind] = pair_log_probs(model, rows, pad_id, max_len)
        del model
        block[kind] = {**preference_scores(*logps[kind]), "eval_seconds": round(time.perf_counter() - t0, 1)}
        log.info("pairs, %s: accuracy %.3f", kind, block[kind]["preference_accuracy"])
    block["tuned"].update(reward_scores(logps["tuned"], logps["sft"], beta))
    block["delta_tuned_minus_sft"] = {
        k: block["tuned"][k] - block["sft"][k] for k in ("preference_accuracy", "mean_logp_margin")
    }
    return block
