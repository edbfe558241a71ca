"""The tokenizer Kiln trains with splits text the way llama.cpp does for the same GGUF file.

transformers rebuilds a GGUF vocabulary (`tokenizer.ggml.model: gpt2`) with a plain ByteLevel
pre-tokenizer, whatever the file's `tokenizer.ggml.pre` names; llama.cpp runs the named one. For
SmolLM2 (`smollm`: every digit on its own, then GPT-2's regex) the two split whitespace runs before
a digit differently: `hello\\n\\n12` was `\\n` `\\n` `1` `2` in training and `\\n\\n` `1` `2` in
llama.cpp, so a prompt holding `?\\n\\n6 plums` failed the GGUF's token check after training. The
original Hugging Face tokenizer of SmolLM2 is that same sequence (Digits, then ByteLevel).

``match_llama_cpp`` sets the pre-tokenizer llama.cpp runs for the names Kiln knows (their regexes
as in llama.cpp's `llama-vocab.cpp`, which mirrors each family's Hugging Face tokenizer); for an
unknown name it leaves the tokenizer as it is and says so. ``PROBES`` are the texts the base model
stage checks token for token against llama.cpp on the source GGUF, before anything trains.

Written here because neither transformers nor the `gguf` package maps `tokenizer.ggml.pre` back to
a Hugging Face pre-tokenizer (transformers' GGUF converter ignores the field).
"""

from __future__ import annotations

import itertools


def _byte_level(use_regex: bool = True):
    from tokenizers import pre_tokenizers

    # trim_offsets off, as transformers' GGUF tokenizer has it: the answer mask is found from
    # character offsets (kiln.tokenize), which must keep covering a token's leading space
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=use_regex)


def _smollm():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer llama.cpp's splitting equals
KNOWN = {"smollm": _smollm, "gpt-2": _byte_level}


def match_llama_cpp(tokenizer, pre: str | None) -> str:
    """Give a byte-level BPE ``tokenizer`` the pre-tokenizer llama.cpp runs for ``pre``; what was done."""
    if pre not in KNOWN:
        return f"unknown to Kiln: {pre!r} (the tokenizer is kept as transformers built it)"
    tokenizer.backend_tokenizer.pre_tokenizer = KNOWN[pre]()
    return f"{pre}: as llama.cpp splits it"


def _probes() -> list[str]:
    """Whitespace runs before digits, letters and punctuation; tabs, CRLF, Unicode, code, numbers."""
    spaces = [" ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", "\r\n", "\r\n\r\n", " \n", "\n ", "\n\t", " \t"]
    after = ["1", "12", "7.5", "2026-12-02", "a", "Order", "(1)", "-3", "é", "日本", "🙂", "'s", "{", "#"]
    texts = [f"x{s}{a}" for s, a in itertools.product(spaces, after)]
    texts += [f"{a}{s}" for s, a in itertools.product(spaces, after)]  # runs at the end
    texts += [
        "hello\n\n12",
        "…?\n\n6 plums\n9 lemons",
        "x\n\n1. first\n2. second",
        "def f(x):\n    return x  # 42\n\n\nprint(f(1))",
        '{"qty": 3, "price": 12.50, "date": "2026-01-31"}',
        "Straße 12, 1010 Wien\r\n\r\nTel. +43 1 234",
        "   leading spaces 1\ttab\t2",
        "３ full-width digits ٣ and ½",
    ]
    return texts


PROBES = _probes()
