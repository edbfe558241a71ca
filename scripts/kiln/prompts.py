"""Which prompts each check and evaluation runs, in one place: evaluation's (the test split's chat
prompts, or a text task's continuation prompts), which the GGUF export checks its token ids on too;
the merge's and the export's validation texts; the merge's pipeline-check prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.families import generation_prompt

if TYPE_CHECKING:
    from kiln.spec import EvaluateSettings


def continuation_prompts(test, tokenizer, count: int, prefix_tokens: int = 64, reference_tokens: int = 64):
    """A text task's samples: the first held-out documents cut after half their tokens (at most
    prefix_tokens), each model continues the prefix, and the document's own next tokens are the
    reference. Greedy, like every generation here, so reruns and repro compare exactly."""
    prompts, refs, rows = [], [], []
    for row in test:
        if len(prompts) >= count:
            break
        if row["kind"] != "text":
            continue
        ids = tokenizer(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
        if len(ids) < 4:
            continue
        cut = min(prefix_tokens, len(ids) // 2)
        prompts.append(tokenizer.decode(ids[:cut]))
        refs.append(tokenizer.decode(ids[cut : cut + reference_tokens]))
        rows.append(row)
    return prompts, refs, rows


def prompts_and_references(test, tokenizer, max_samples: int):
    """Each chat row's turns before its final answer, rendered for generation, and that answer."""
    prompts, refs, rows = [], [], []
    for row in test.select(range(min(max_samples, len(test)))):
        if row["kind"] != "chat":
            continue
        prompts.append(generation_prompt(tokenizer, row["messages"][:-1]))
        refs.append(row["messages"][-1]["content"])
        rows.append(row)
    return prompts, refs, rows


def evaluation_prompts(test, tokenizer, settings: EvaluateSettings) -> list[str]:
    """The prompts evaluation generates from: the chat rows' prompts, or (no chat rows: a text
    task) the continuation prompts. The GGUF export checks its token ids on exactly these."""
    s = settings
    prompts, _, _ = prompts_and_references(test, tokenizer, s.max_samples)
    if not prompts:
        prompts, _, _ = continuation_prompts(test, tokenizer, s.continuations)
    return prompts


def _validation_rows(dataset_dir: str, n: int):
    """The dataset's first n validation rows (train's where validation is empty)."""
    import datasets

    datasets.disable_caching()  # no cache-*.arrow files written into another rule's output

    dd = datasets.load_from_disk(dataset_dir)
    split = dd["validation"] if len(dd["validation"]) else dd["train"]
    return split.select(range(min(n, len(split))))


def validation_prompts(dataset_dir: str, tokenizer, n: int) -> list[str]:
    rows = _validation_rows(dataset_dir, n)
    return [
        tokenizer.apply_chat_template(m, tokenize=False) if k == "chat" else m[0]["content"]
        for m, k in zip(rows["messages"], rows["kind"], strict=True)
    ]


def check_prompt(dataset_dir: str, tokenizer) -> tuple[str, int]:
    """The pipeline check's prompt and new-token budget: the first validation conversation's turns
    before its answer (what the model was trained to answer and then end), with room for the
    reference answer and 16 tokens more. A task-specific model need not end an off-task turn: the
    "Say hello." used before found a 48-step default adapter repeating itself for 48 tokens (a
    56-step one stopped), which says nothing about the saved end-of-turn settings this checks. No
    conversation (a plain-text task): that generic prompt and 48 tokens."""
    for row in _validation_rows(dataset_dir, 32):
        if row["kind"] == "chat" and len(row["messages"]) >= 2:
            prompt = generation_prompt(tokenizer, row["messages"][:-1])
            answer = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
            return prompt, len(answer) + 16
    generic = [{"role": "user", "content": "Say hello."}]
    return generation_prompt(tokenizer, generic), 48
