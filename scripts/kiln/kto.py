"""Kahneman-Tversky optimisation with TRL's KTOTrainer (issue 27): the tokenized preference rows as
KTO's labelled answers, the trainer with Kiln's corrections, and its config.

Rows: the tokenize stage (kiln.pair_tokens) holds pairs and unpaired rows alike as ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids`` (an unpaired row's other answer empty). KTO trains on answers one at
a time, each marked desirable (``label`` true: a chosen answer) or not (a rejected one), which is what
TRL's ``unpair_preference_dataset`` makes of a pair. One difference, on purpose: TRL unpairs a map
batch (1,000 pairs by default) as all its chosen answers, then all its rejected ones, and KTO reads its
rows in order (``train_sampling_strategy: sequential``, which its KL estimate needs), so a run of
fewer steps than half the dataset never saw an undesirable answer. ``unpaired_rows`` keeps each
pair's two answers next to each other instead. The KL completions are then TRL's: the completions
rotated by one inside each micro-batch (``add_kl_completion_ids`` in kto_trainer.py), so each prompt is
scored with another row's answer.

Reference: as for DPO, TRL copies the SFT adapter the policy starts from into the frozen adapter
``ref``; resuming loads the policy from the checkpoint's root (kiln.dpo.resume_policy).
"""

from __future__ import annotations

import functools

from kiln.pair_tokens import PAIR_COLUMNS

KTO_COLUMNS = ("prompt_ids", "completion_ids", "label")


def unpaired_rows(ds):
    """Tokenized preference rows -> KTO's rows: a pair gives its chosen answer (label true) then its
    rejected one (label false), next to each other; an unpaired row gives its one answer."""
    import datasets

    out = {c: [] for c in KTO_COLUMNS}
    for prompt, chosen, rejected in zip(*(ds[c] for c in PAIR_COLUMNS), strict=True):
        for answer, label in ((chosen, True), (rejected, False)):
            if answer:
                out["prompt_ids"].append(prompt)
                out["completion_ids"].append(answer)
                out["label"].append(label)
    features = datasets.Features(
        {
            "prompt_ids": datasets.List(datasets.Value("int32")),
            "completion_ids": datasets.List(datasets.Value("int32")),
            "label": datasets.Value("bool"),
        }
    )
    return datasets.Dataset.from_dict(out, features=features)


def with_kl_completions(ds, batch_size: int):
    """TRL's KL completions (kto_trainer.py ``add_kl_completion_ids``): within each batch of
    ``batch_size`` rows, row i is also scored with row i-1's completion (the first with the last's)."""

    def rotate(batch):
        batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
        return batch

    return ds.map(rotate, batched=True, batch_size=batch_size)


@functools.cache
def kto_trainer_class():
    """TRL's KTOTrainer with Kiln's corrections (kiln.trainer.PreferenceCorrections), on Kiln's tokenized rows."""
    from trl import KTOTrainer

    from kiln.dpo import resume_policy
    from kiln.trainer import PreferenceCorrections

    class KilnKTOTrainer(PreferenceCorrections, KTOTrainer):
        """- rows arrive tokenized by Kiln's tokenize stage (``_prepare_dataset`` turns them into KTO's
          labelled answers and adds TRL's KL completions);
        - the policy resumes from the checkpoint's root (kiln.dpo.resume_policy)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not all(c in dataset.column_names for c in PAIR_COLUMNS):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            rows = unpaired_rows(dataset)
            if args.max_length is not None:  # TRL drops rows whose prompt alone fills max_length
                rows = rows.filter(lambda r: len(r["prompt_ids"]) < args.max_length)
            return with_kl_completions(rows, args.per_device_train_batch_size) if self.calculate_KL else rows

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            resume_policy(model or self.model, resume_from_checkpoint)

    return KilnKTOTrainer


def kto_args(job, report_to: list[str]):
    """TRL's KTOConfig for a kiln.pref_train.PreferenceJob after its setup phase."""
    from trl import KTOConfig

    from kiln.trainer import preference_args

    s = job.s
    return KTOConfig(
        **preference_args(job, report_to),
        loss_type=s.loss_type,
        desirable_weight=s.desirable_weight,
        undesirable_weight=s.undesirable_weight,
    )
