"""Odds-ratio preference optimisation with TRL's ORPOTrainer (``trl.experimental.orpo``, issue 27):
the trainer on Kiln's tokenized pairs, with Kiln's corrections, and its config.

ORPO needs no reference model: its loss is the chosen answer's negative log-likelihood plus ``beta``
(the paper's lambda) times the log-sigmoid of the log odds ratio of chosen over rejected. In Kiln it
continues the SFT experiment's adapter (``from_experiment``) like dpo and kto, so the SFT task and
its evaluation are that experiment's; the frozen reference those methods keep is not made.

Tokens: ORPOTrainer tokenizes its own way (the chat template rendered to text, prompt and answer
encoded apart, an end-of-sequence token appended where the answer's last token is not one). Kiln
gives it the pairs its tokenize stage made for every preference method (kiln.pair_tokens: the chat
template's own ids, TRL's DPOTrainer's rule), so the answer ends as the template ends a turn (for
ChatML ``<|im_end|>`` and a newline, where ORPOTrainer would add a second ``<|im_end|>``), and
evaluation scores the ids training saw. ``orpo_row`` lays them out as ORPOTrainer's collator reads
them: prompt, then prompt + answer with the prompt's labels -100, the answer cut where prompt + answer
pass ``max_length`` (ORPOTrainer's own truncation).
"""

from __future__ import annotations

import functools


def orpo_row(row: dict, max_length: int) -> dict:
    """One tokenized pair (prompt_ids / chosen_ids / rejected_ids) in ORPOTrainer's columns."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(row[f"{side}_ids"])[: max(0, max_length - len(prompt))]
        ids = prompt + answer
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [-100] * len(prompt) + answer
    return out


@functools.cache
def orpo_trainer_class():
    """TRL's ORPOTrainer with Kiln's corrections (kiln.trainer.PreferenceCorrections), on Kiln's tokenized pairs."""
    from trl.experimental.orpo import ORPOTrainer

    from kiln.trainer import PreferenceCorrections

    class KilnORPOTrainer(PreferenceCorrections, ORPOTrainer):
        """Pairs arrive tokenized by Kiln's tokenize stage (``tokenize_row`` lays them out)."""

        def tokenize_row(self, feature, model=None):
            if "prompt_ids" in feature:
                return orpo_row(feature, self.max_length)
            return super().tokenize_row(feature, model)

    return KilnORPOTrainer


def orpo_args(job, report_to: list[str]):
    """TRL's ORPOConfig for a kiln.pref_train.PreferenceJob after its setup phase."""
    from trl.experimental.orpo import ORPOConfig

    from kiln.trainer import preference_args

    return ORPOConfig(**preference_args(job, report_to), remove_unused_columns=False)
