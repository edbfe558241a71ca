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
    """TRL's ORPOTrainer with the corrections Kiln's other trainers have, on Kiln's tokenized pairs."""
    from trl.experimental.orpo import ORPOTrainer

    from kiln.trainer import (
        _cast_adapters,
        _deterministic_target_modules,
        _one_cpu_kernel,
        _save_recorded_then_rotate,
        _use_readable_progress,
    )

    class KilnORPOTrainer(ORPOTrainer):
        """- pairs arrive tokenized by Kiln's tokenize stage (``tokenize_row`` lays them out);
        - the adapter's dtype, one CPU kernel, sorted target modules, checkpoints recorded complete
          before rotation, no TRL model card (kiln.trainer says why)."""

        def __init__(self, *args, adapter_dtype=None, **kwargs):
            super().__init__(*args, **kwargs)
            _deterministic_target_modules(self.model)
            _one_cpu_kernel(self.model)
            _use_readable_progress(self)
            _cast_adapters(self.model, adapter_dtype)

        def tokenize_row(self, feature, model=None):
            if "prompt_ids" in feature:
                return orpo_row(feature, self.max_length)
            return super().tokenize_row(feature, model)

        def create_model_card(self, *args, **kwargs):
            """Not written (kiln.trainer's KilnSFTTrainer.create_model_card says why)."""

        def _save_checkpoint(self, model, trial):
            _save_recorded_then_rotate(self, super()._save_checkpoint, model, trial)

    return KilnORPOTrainer


def orpo_args(job, report_to: list[str]):
    """TRL's ORPOConfig for a kiln.pref_train.PreferenceJob after its setup phase."""
    import torch
    from trl.experimental.orpo import ORPOConfig

    from kiln.trainer import schedule_args

    s = job.s
    return ORPOConfig(
        **schedule_args(job),
        prediction_loss_only=True,
        seed=s.seed,
        data_seed=s.seed,
        bf16=job.dtype == torch.bfloat16,
        fp16=job.dtype == torch.float16,
        use_cpu=not job.cuda,
        max_length=job.tokenize.max_seq_len,
        beta=s.beta,
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
        report_to=report_to,
        run_name=job.experiment,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
