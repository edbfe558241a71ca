"""What the stages report, as types: the JSON records written after the data stages and after
training (shard, dataset and tokenize statistics; the training summary; metrics; the GGUF
verification; the merge report), which the manifest gathers (kiln.manifest_record). The pages, the
model card, the comparison and ``kiln repro`` read them as attributes (``metrics.tuned.loss``)
instead of each knowing every file's shape again.

Pydantic, where kiln.spec uses stdlib dataclasses: these are read from disk after a run, maybe by a
later Kiln or from a manifest someone sent, so what a type is for here is validating nested JSON and
saying which field of which file is wrong; parse time is not at stake (only the audit jobs read
them). Each record keeps the keys it does not declare (``extra="allow"``: a newer file still reads,
and ``to_dict()`` gives back what was read); fields that came after a record's first version have
defaults, so older files read too. The writers (the data stages, evaluate, export) still write
plain dicts: the bytes of a run's records are theirs, unchanged by these readers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kiln.metrics import MODELS, scalar_metrics
from kiln.metrics import task_metrics as _task_metrics


class Record(BaseModel):
    """A JSON record a stage wrote: read with ``read(path)``, given back with ``to_dict()``."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    @classmethod
    def from_dict(cls, data: Any, where: str = ""):
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            at = ".".join(str(p) for p in first["loc"]) or "(the whole record)"
            raise ValueError(
                f"{where or cls.__name__}: {at}: {first['msg']} (not a record this Kiln reads; "
                "rebuild it: delete the file and rerun snakemake)"
            ) from None

    @classmethod
    def read(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)


# ---- the data stages -------------------------------------------------------------------------
class Split(Record):
    rows: int
    fingerprint: str  # sha256 over the split's row ids and content hashes


class Edit(Record):
    before: Any
    after: Any


class ShardStats(Record):
    """One cleaned shard's record (``stats/<source>/<shard>.json``)."""

    rows_in: int
    rows_clean: int
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = {}
    rows_edited_by: dict[str, int] = {}
    examples_by_step: dict[str, list[Edit]] = {}
    download: dict | None = None  # a url shard: final URL, bytes, sha256 of what came
    skipped_file: dict | None = None  # set aside by on_bad_file: skip


class NearDuplicate(Record):
    held_out: Any
    train: Any


class HeldOutAudit(Record):
    rows: int
    near_duplicates_of_train: int
    examples: list[NearDuplicate] = []


class Contamination(Record):
    """The contamination audit of the build stage (held-out rows that nearly duplicate train)."""

    skipped: str | None = None
    threshold: float | None = None
    decontaminated: bool = False
    validation: HeldOutAudit | None = None
    test: HeldOutAudit | None = None

    def held_out(self) -> dict[str, HeldOutAudit]:
        return {k: v for k, v in (("validation", self.validation), ("test", self.test)) if v is not None}


class DatasetStats(Record):
    """The build stage's record (``dataset_stats.json``)."""

    rows_in: int
    rows_rejected: int
    splits: dict[str, Split]
    rejected_by_reason: dict[str, int] = {}
    mixture: dict[str, dict] = {}
    contamination: Contamination = Contamination()
    orphaned_shards: list[str] = []


class TokenizedSplit(Record):
    rows_kept: int
    tokens: int
    trainable_tokens: int
    truncated: int
    length: dict[str, float] = {}
    length_histogram: list[int] = []
    length_bin_edges: list[float] = []

    def counts(self) -> dict[str, int]:
        """What the manifest keeps of a split: rows kept, tokens, trainable tokens, truncated rows."""
        return {
            "rows_kept": self.rows_kept,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "truncated": self.truncated,
        }


class TokenizeStats(Record):
    """The tokenize stage's record (``tokenized/<model>-<hash>.json``)."""

    max_seq_len: int
    packing: bool = False
    splits: dict[str, TokenizedSplit]


# ---- evaluation ------------------------------------------------------------------------------
class Score(Record):
    """One model's block of metrics.json: loss and perplexity where measured, the task's metrics
    (named by the task, so they are the record's own keys: ``value(name)``), counts and timings."""

    n: int | None = None
    loss: float | None = None
    perplexity: float | None = None
    length: dict[str, float] | None = None  # free text: answer lengths in words
    per_label: dict[str, dict] | None = None  # label task
    confusion: dict[str, dict[str, int]] | None = None

    def value(self, name: str) -> float | None:
        return scalar_metrics(self.to_dict()).get(name)


class RegressionSet(Record):
    rows: int
    tuned_minus_base_loss: float | None = None
    base: Score | None = None
    base_4bit: Score | None = None
    tuned: Score | None = None
    adapter_4bit: Score | None = None

    def scores(self) -> dict[str, Score]:
        return {k: s for k in MODELS if (s := getattr(self, k)) is not None}


class HarnessScores(Record):
    """lm-evaluation-harness results (opt-in: evaluate.lm_eval), base vs tuned: task -> metric -> value."""

    tasks: list[str] = []
    base: dict[str, dict[str, Any]] = {}
    tuned: dict[str, dict[str, Any]] = {}


class PairScore(Record):
    """One model on the held-out preference pairs (kiln.pair_eval)."""

    pairs: int
    preference_accuracy: float | None = None  # None: no pair in the test split (kto, unpaired rows)
    mean_logp_margin: float | None = None
    reward_accuracy: float | None = None  # the tuned model against its reference (the SFT model)
    mean_reward_margin: float | None = None
    beta: float | None = None


class UnpairedScore(Record):
    """The tuned model's implicit reward of held-out unpaired answers against their labels (kiln.pair_eval)."""

    rows: int
    desirable: int
    undesirable: int
    label_accuracy: float
    mean_desirable_reward: float | None = None
    mean_undesirable_reward: float | None = None


class PreferenceScores(Record):
    """metrics.json ``preference``: a preference run's held-out pairs, base -> SFT -> tuned."""

    method: str
    from_experiment: str
    pairs: int
    base: PairScore
    sft: PairScore
    tuned: PairScore
    unpaired: UnpairedScore | None = None  # kto: held-out answers marked desirable or not

    def rows(self) -> list[dict]:
        """One row per model: what the manifest page, the card and README show."""
        names = {"base": "base", "sft": f"SFT ({self.from_experiment})", "tuned": f"{self.method.upper()} (this model)"}
        return [
            {
                "model": names[k],
                "preference accuracy": s.preference_accuracy,
                "log-prob margin (nats)": s.mean_logp_margin,
                "reward margin vs SFT": s.mean_reward_margin,
            }
            for k, s in (("base", self.base), ("sft", self.sft), ("tuned", self.tuned))
        ]


class Metrics(Record):
    """metrics.json: every model scored on the test rows (the GGUF files as ``gguf_<type>``)."""

    experiment: str = ""
    task: str = ""
    task_reason: str = ""
    generated_rows: int | None = None
    main_metric: str | None = None
    base: Score | None = None
    base_4bit: Score | None = None
    tuned: Score | None = None
    adapter_4bit: Score | None = None
    regression: dict[str, RegressionSet] = {}
    lm_eval: HarnessScores | None = None
    preference: PreferenceScores | None = None  # a preference run (training.method dpo)
    sft: dict | None = None  # ...and its SFT model's task metrics, on the same test rows

    @property
    def main(self) -> str:
        """The metric the experiment is judged by (kiln.metrics.main_metric)."""
        return self.main_metric or "exact_match"

    @property
    def task_metric_names(self) -> list[str]:
        return _task_metrics(self.to_dict())

    def ggufs(self) -> dict[str, Score]:
        """The exported GGUF files evaluate scored, in file order."""
        extra = self.model_extra or {}
        return {k: Score.from_dict(v, k) for k, v in extra.items() if k.startswith("gguf_") and isinstance(v, dict)}

    def scores(self) -> dict[str, Score]:
        """Every model block: those of kiln.metrics.MODELS, then the GGUF exports."""
        return {**{k: s for k in MODELS if (s := getattr(self, k)) is not None}, **self.ggufs()}

    def value(self, model: str, name: str) -> float | None:
        score = self.scores().get(model)
        return None if score is None else score.value(name)


# ---- export and merge ------------------------------------------------------------------------
class Converter(Record):
    name: str
    version: str | None = None


class GgufMetadata(Record):
    architecture: str | None = None
    tokenizer_model: str | None = None
    tokenizer_pre: str | None = None


class TokenIdCheck(Record):
    prompts: int
    identical: int
    differences: list = []


class LogprobCheck(Record):
    prompts: int = 0
    max_abs_prob_diff: float
    tolerance: float | None = None
    probabilities_withheld: int = 0  # prompts whose greedy token llama.cpp returned without them


class OllamaCheck(Record):
    modelfile: bool | None = None
    template: bool | None = None
    note: str | None = None


class GgufReport(Record):
    """One exported GGUF file and what its verification in llama.cpp found (``verify-<type>.json``)."""

    gguf: str
    type: str
    sha256: str
    size_mb: float
    converter: Converter
    metadata: GgufMetadata = GgufMetadata()
    token_ids: TokenIdCheck
    logprobs: LogprobCheck
    ollama: OllamaCheck | None = None
    problems: list[str] = []
    ok: bool = False


class MergeReport(Record):
    """merge_report.json (the merge-drift check); the manifest shows where it merged and the dtype."""

    merge_onto: str | None = None
    saved_dtype: str | None = None


# ---- training ------------------------------------------------------------------------------
class TrainSummary(Record):
    """train_summary.json: what the training job did (steps, tokens, losses, memory, where it ran)."""

    backend: str
    steps: int
    tokens_trained: int
    first_loss: float | None = None
    final_loss: float | None = None
    device: str = ""
    hardware: dict | None = None
    packages: dict[str, str | None] | None = None  # of the environment training really ran in
