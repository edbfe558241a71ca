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
    """TRL's KTOTrainer with the corrections Kiln's other trainers have, on Kiln's tokenized rows."""
    from trl import KTOTrainer

    from kiln.dpo import resume_policy
    from kiln.trainer import (
        _cast_adapters,
        _deterministic_target_modules,
        _one_cpu_kernel,
        _save_recorded_then_rotate,
        _use_readable_progress,
    )

    class KilnKTOTrainer(KTOTrainer):
        """- rows arrive tokenized by Kiln's tokenize stage (``_prepare_dataset`` turns them into KTO's
          labelled answers and adds TRL's KL completions);
        - the adapter's dtype, one CPU kernel, sorted target modules, checkpoints recorded complete
          before rotation, the policy resumed from the checkpoint's root, no TRL model card (kiln.dpo
          and kiln.trainer say why)."""

        def __init__(self, *args, adapter_dtype=None, **kwargs):
            super().__init__(*args, **kwargs)
            _deterministic_target_modules(self.model)
            _one_cpu_kernel(self.model)
            _use_readable_progress(self)
            _cast_adapters(self.model, adapter_dtype)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not all(c in dataset.column_names for c in PAIR_COLUMNS):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            rows = unpaired_rows(dataset)
            if args.max_length is not None:  # TRL drops rows whose prompt alone fills max_length
                rows = rows.filter(lambda r: len(r["prompt_ids"]) < args.max_length)
            return with_kl_completions(rows, args.per_device_train_batch_size) if self.calculate_KL else rows

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            resume_policy(model or self.model, resume_from_checkpoint)

        def create_model_card(self, *args, **kwargs):
            """Not written (kiln.trainer's KilnSFTTrainer.create_model_card says why)."""

        def _save_checkpoint(self, model, trial):
            _save_recorded_then_rotate(self, super()._save_checkpoint, model, trial)

    return KilnKTOTrainer


def kto_args(job, report_to: list[str]):
    """TRL's KTOConfig for a kiln.pref_train.PreferenceJob after its setup phase."""
    import torch
    from trl import KTOConfig

    from kiln.trainer import schedule_args

    s = job.s
    return KTOConfig(
        **schedule_args(job),
        prediction_loss_only=True,
        seed=s.seed,
        data_seed=s.seed,
        bf16=job.dtype == torch.bfloat16,
        fp16=job.dtype == torch.float16,
        use_cpu=not job.cuda,
        max_length=job.tokenize.max_seq_len,
        beta=s.beta,
        loss_type=s.loss_type,
        desirable_weight=s.desirable_weight,
        undesirable_weight=s.undesirable_weight,
        include_num_input_tokens_seen=True,
        report_to=report_to,
        run_name=job.experiment,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
