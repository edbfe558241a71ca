"""Direct preference optimisation with TRL's DPOTrainer (issue 27): tokens of pairs, the trainer
with Kiln's corrections, and its config.

Tokens: the tokenize stage turns each pair into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``
the way TRL's ``DPOTrainer._prepare_dataset`` does (the chat template's generation prompt for the
prompt, the whole conversation for each answer, the completion starting where the two token lists
diverge); tests/test_dpo.py holds the two to the same ids. Done in the cached, audited stage rather
than at trainer start, so the tokens, their counts and truncation are in the tokenize stats and
evaluation scores the very ids training saw.

Reference: TRL copies the SFT adapter the policy starts from into a frozen adapter ``ref`` and
scores the reference with it (``use_adapter(model, "ref")`` in ``compute_ref_log_probs``): the
reference is the SFT model exactly, with no second copy of the base weights.

CPU: TRL's DPO loss projects hidden states through the LM head with a chunked Triton kernel
(``_ChunkedLogProbFunction``), which a CPU machine does not have (no Triton). ``PlainChunkedLogProb``
computes the same per-token quantities with torch's ops, token chunk by token chunk, and is put in
its place only where the kernel is missing.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from kiln.pairs import split_prompt

log = logging.getLogger(__name__)
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_tokens(tokenizer, turns: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """One canonical pair's prompt, chosen and rejected ids, as TRL's DPOTrainer tokenizes a
    conversational pair (trl 1.15 dpo_trainer.py ``tokenize_fn``)."""
    from trl.data_utils import common_prefix_length

    prompt, answers = split_prompt(turns)

    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    chosen = ids(prompt + [{"role": "assistant", "content": answers["chosen"]}])
    rejected = ids(prompt + [{"role": "assistant", "content": answers["rejected"]}])
    n = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
    return prompt_ids[:n], chosen[n:], rejected[n:]


def tokenize_pairs(ds, tokenizer, max_seq_len: int):
    """A split of pairs -> (datasets.Dataset of kiln_id + PAIR_COLUMNS, its stats). A pair whose
    prompt alone fills max_seq_len would train on nothing (TRL drops it too): left out and counted."""
    import datasets

    rows = {"kiln_id": [], **{c: [] for c in PAIR_COLUMNS}}
    dropped, lengths, tokens, trainable = [], [], 0, 0
    for kiln_id, kind, turns in zip(ds["kiln_id"], ds["kind"], ds["messages"], strict=True):
        if kind != "preference":
            raise ValueError(f"row {kiln_id} is a {kind} row in a dataset of pairs (method dpo trains on pairs only)")
        p, c, r = pair_tokens(tokenizer, turns)
        if len(p) >= max_seq_len:
            dropped.append(kiln_id)
            continue
        for col, value in zip(("kiln_id", *PAIR_COLUMNS), (kiln_id, p, c, r)):
            rows[col].append(value)
        lengths.append(len(p) + max(len(c), len(r)))
        # what training sees of the pair's two sequences (each cut to max_seq_len, its start kept)
        seen = [min(len(p) + len(a), max_seq_len) for a in (c, r)]
        tokens += sum(seen)
        trainable += sum(n - len(p) for n in seen)
    n = np.asarray(lengths, dtype=np.int64)
    stats = {
        "rows": len(ds),
        "rows_kept": len(rows["kiln_id"]),
        "pairs": len(rows["kiln_id"]),
        "dropped_prompt_fills_max_seq_len": {"count": len(dropped), "kiln_ids": dropped[:100]},
        "truncated": int(np.sum(n > max_seq_len)),
        "tokens_before_truncation": int(n.sum()),
        # both sequences of each pair: prompt + chosen and prompt + rejected
        "tokens": int(tokens),
        "trainable_tokens": int(trainable),
        # a pair's length: its prompt and its longer answer
        "length": {
            q: int(np.percentile(n, p)) if len(n) else 0
            for q, p in (("min", 0), ("p50", 50), ("p95", 95), ("max", 100))
        },
        "length_histogram": np.histogram(n, bins=20)[0].tolist() if len(n) else [],
        "length_bin_edges": np.histogram_bin_edges(n, bins=20).round(1).tolist() if len(n) else [],
    }
    features = datasets.Features(
        {"kiln_id": datasets.Value("string"), **{c: datasets.List(datasets.Value("int32")) for c in PAIR_COLUMNS}}
    )
    return datasets.Dataset.from_dict(rows, features=features), stats


class PlainChunkedLogProb:
    """TRL's ``_ChunkedLogProbFunction`` in plain torch (autograd does the backward): per-token
    log-probability of each target and the optional extras, LM head applied a chunk of tokens at a time."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, *rest):
        """TRL's positional call: ``rest`` is (chunk_size, final_logit_softcapping, logit_scale, outputs)."""
        import torch

        _, softcap, logit_scale, outputs = (*rest, *(None, None, 1.0, ())[len(rest) :])

        parts: dict[str, list] = {k: [] for k in ("log_probs", *outputs)}
        step = max(1, 1024 * 1024 * 64 // max(1, weight.shape[0] * 4))  # ~64 MiB of float32 logits a chunk
        for a in range(0, hidden.shape[0], step):
            z = torch.nn.functional.linear(hidden[a : a + step], weight, bias).float() * logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            z = z / temperature
            logp = torch.log_softmax(z, dim=-1)
            t = targets[a : a + step]
            parts["log_probs"].append(logp.gather(-1, t[:, None]).squeeze(-1))
            if "entropy" in outputs:
                parts["entropy"].append(-(logp.exp() * logp).sum(-1))
            if "log_sum_sq_probs" in outputs:
                parts["log_sum_sq_probs"].append(torch.logsumexp(2 * logp, dim=-1).detach())
            if "mean_logits" in outputs:
                parts["mean_logits"].append(z.mean(-1).detach())
            if "is_top1" in outputs:
                parts["is_top1"].append((z.argmax(-1) == t).detach())
        joined = {k: torch.cat(v) if v else hidden.new_zeros(0) for k, v in parts.items()}
        return tuple(joined.get(k) for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))


def ensure_logprob_kernel() -> str:
    """TRL's Triton kernel where it is importable, else the plain one; says which."""
    from trl.trainer import utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is None:
        trl_utils._ChunkedLogProbFunction = PlainChunkedLogProb
        return "plain torch (no Triton on this machine: kiln.dpo.PlainChunkedLogProb)"
    if trl_utils._ChunkedLogProbFunction is PlainChunkedLogProb:
        return "plain torch (no Triton on this machine: kiln.dpo.PlainChunkedLogProb)"
    return "TRL's chunked Triton kernel"


def load_policy(base_model, sft_adapter: str):
    """The SFT adapter on the base, trainable: the policy. TRL's DPOTrainer copies it into the frozen
    adapter ``ref`` when it is given a PEFT model with no ref_model (trl 1.15 dpo_trainer.py)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, sft_adapter, is_trainable=True)


@functools.cache
def dpo_trainer_class():
    """TRL's DPOTrainer with the corrections Kiln's SFTTrainer has (kiln.trainer), on pre-tokenized pairs."""
    from trl import DPOTrainer

    from kiln.trainer import (
        _cast_adapters,
        _deterministic_target_modules,
        _one_cpu_kernel,
        _save_recorded_then_rotate,
        _use_readable_progress,
    )

    class KilnDPOTrainer(DPOTrainer):
        """- pairs arrive tokenized by Kiln's tokenize stage (``_prepare_dataset`` passes them on);
        - TRL casts QLoRA adapters to bfloat16 whatever the compute dtype (``adapter_dtype`` undoes it);
        - one CPU kernel for 4-bit layers, sorted target modules, checkpoints recorded complete
          before rotation, no TRL model card in the checkpoint folder (as kiln.trainer says why)."""

        def __init__(self, *args, adapter_dtype=None, **kwargs):
            super().__init__(*args, **kwargs)
            _deterministic_target_modules(self.model)
            _one_cpu_kernel(self.model)
            _use_readable_progress(self)
            _cast_adapters(self.model, adapter_dtype)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if all(c in dataset.column_names for c in PAIR_COLUMNS):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def create_model_card(self, *args, **kwargs):
            """Not written (kiln.trainer's KilnSFTTrainer.create_model_card says why)."""

        def _save_checkpoint(self, model, trial):
            _save_recorded_then_rotate(self, super()._save_checkpoint, model, trial)

    return KilnDPOTrainer


def dpo_args(job, report_to: list[str]):
    """TRL's DPOConfig for a kiln.pref_train.PreferenceJob after its setup phase."""
    import torch
    from trl import DPOConfig

    from kiln.trainer import schedule_args

    s = job.s
    return DPOConfig(
        **schedule_args(job),
        prediction_loss_only=True,
        seed=s.seed,
        data_seed=s.seed,
        bf16=job.dtype == torch.bfloat16,
        fp16=job.dtype == torch.float16,
        use_cpu=not job.cuda,
        max_length=job.tokenize.max_seq_len,
        beta=s.beta,
        # RPO: the preference loss plus TRL's sft loss on the chosen answer, weighted (training.sft_weight)
        loss_type=[s.loss_type, "sft"] if s.sft_weight else [s.loss_type],
        loss_weights=[1.0, s.sft_weight] if s.sft_weight else None,
        label_smoothing=s.label_smoothing,
        include_num_input_tokens_seen=True,
        report_to=report_to,
        run_name=job.experiment,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def is_pair_dataset(dd) -> bool:
    """A built dataset of pairs (its first row, in any split, is a preference row)."""
    return any(len(ds) and ds[0]["kind"] == "preference" for ds in dd.values())


def tokenize_pair_dataset(dd, tokenizer, max_seq_len: int, out_dir, stats_path) -> dict:
    """The tokenize stage for a dataset of pairs: every split through ``tokenize_pairs``, saved."""
    import json
    from pathlib import Path

    from kiln.tables import save_splits

    out, stats = {}, {"max_seq_len": max_seq_len, "packing": False, "pairs": True, "splits": {}}
    for split, ds in dd.items():
        out[split], stats["splits"][split] = tokenize_pairs(ds, tokenizer, max_seq_len)
        if stats["splits"][split]["truncated"]:
            log.warning(
                "%s: %d pairs longer than max_seq_len=%d are truncated in training (TRL keeps their start)",
                split,
                stats["splits"][split]["truncated"],
                max_seq_len,
            )
    save_splits(out, out_dir)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    return stats
