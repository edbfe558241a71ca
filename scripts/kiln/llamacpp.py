"""llama.cpp's server in this process (xllamacpp): the client export, evaluate, base_model and
`kiln serve` use to tokenize, complete and generate with a GGUF file."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaCpp:
    """llama.cpp's server, in this process (xllamacpp), on ``host:port``: the OpenAI-compatible
    endpoints (/v1/chat/completions, /v1/completions) and llama.cpp's own (/tokenize, /completion).

    ``port=0`` picks a free port. ``slots``: requests decoded in parallel."""

    def __init__(
        self,
        gguf: str | Path,
        n_ctx: int = 4096,
        threads: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        slots: int = 1,
        quiet: bool = True,
    ):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx * slots
        params.n_parallel = slots
        self.slots = slots
        threads = threads or len(os.sched_getaffinity(0))
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.hostnames = [host]  # 127.0.0.1 unless asked: not reachable from other machines
        params.port = port or free_port(host)
        if quiet:
            params.verbosity = -1
        self.server = xllamacpp.Server(params)
        self.url = self.server.listening_address

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def complete(self, prompt: str, n_predict: int, n_probs: int = 0, stop: list[str] | None = None) -> dict:
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1, "cache_prompt": False}
        if n_probs:
            body |= {"n_probs": n_probs, "return_tokens": True}
        if stop:
            body["stop"] = stop
        return self.post("/completion", body)

    def close(self) -> None:
        """Stop the server (xllamacpp's destructor ends its loop and frees the model)."""
        self.__dict__.pop("server", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_parity(server: LlamaCpp, tokenizer, prompts: list[str]) -> dict:
    """llama.cpp's ids of every prompt against Hugging Face's; every differing prompt with its text,
    where the ids first part, and both token sequences from there (ids and tokens)."""
    differ = []
    for i, text in enumerate(prompts):
        hf = tokenizer(text, add_special_tokens=False)["input_ids"]
        cpp = server.tokenize(text)
        if hf != cpp:
            at = next((j for j, (a, b) in enumerate(zip(hf, cpp)) if a != b), min(len(hf), len(cpp)))
            differ.append(
                {
                    "prompt": i,
                    "text": text[:2000],
                    "first_difference_at": at,
                    "hf": hf[at : at + 8],
                    "llama_cpp": cpp[at : at + 8],
                    "hf_tokens": tokenizer.convert_ids_to_tokens(hf[at : at + 8]),
                    "llama_cpp_tokens": tokenizer.convert_ids_to_tokens(cpp[at : at + 8]),
                }
            )
    return {"prompts": len(prompts), "identical": len(prompts) - len(differ), "differences": differ}


def generate(
    server: LlamaCpp, prompts: list[str], max_new_tokens: int, stop: str, desc: str = ""
) -> tuple[list[str], dict]:
    """Greedy generation of every prompt in llama.cpp (the evaluation's decoding), with its speed.

    The prompts go to the server's slots in parallel (llama.cpp decodes them as one batch), answers
    in prompt order."""
    from concurrent.futures import ThreadPoolExecutor

    from kiln.progress import progress

    bar = progress(len(prompts), f"evaluate {desc}: generation")

    def one(text: str) -> dict:
        out = server.complete(text, n_predict=max_new_tokens)
        bar.update(1)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, server.slots)) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - t0
    bar.close()
    outputs = []
    for out in results:
        content = out["content"]
        if stop and stop in content:  # an end-of-turn written as text rather than as the token
            content = content.split(stop)[0]
        outputs.append(content)
    tokens = sum(out["timings"]["predicted_n"] for out in results)
    return outputs, {
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds else None,
        "slots": server.slots,
    }


# Largest |p| difference over llama.cpp's top-k next tokens, merged model vs GGUF, by type. Measured
# on the default run's merged model (16 validation prompts, 2026-11-30): f16 0.0038, q8_0 0.063 (its
# log-probabilities differ by up to 0.66 on tail tokens near p = 0.015, so probabilities, not logs,
# are what is held). float types only round the weights to 16 bits; q8_0 rounds each block of 32 to
# 8 bits; the llama-quantize types lose more.
PROB_TOLERANCE = {"f32": 0.002, "f16": 0.01, "bf16": 0.02, "q8_0": 0.1}
PROB_TOLERANCE_OTHER = 0.25
TOP_K = 5


def logprob_parity(server: LlamaCpp, model, tokenizer, prompts: list[str], qtype: str) -> dict:
    """Next-token probabilities after each prompt: llama.cpp's top-k against the merged model's for
    the same tokens; the largest difference must be within the type's tolerance, and the greedy
    token the same on every prompt. (Log-probability differences are recorded too.)

    llama.cpp's server withholds a token's probabilities while the text generated so far ends in an
    incomplete UTF-8 character (a byte-fallback piece such as the first byte of an emoji); with one
    token to predict they never come. Such a prompt is still checked on its greedy token (the id the
    server returns with ``return_tokens``) and counted in ``probabilities_withheld``; the report is
    ok only if the probabilities were compared on at least one prompt."""
    import math

    import torch

    worst_p = worst_lp = 0.0
    argmax_same = withheld = 0
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        with torch.no_grad():
            ref = torch.log_softmax(model(ids, logits_to_keep=1).logits[0, -1].float(), dim=-1)
        answer = server.complete(text, n_predict=1, n_probs=TOP_K)
        probs = answer.get("completion_probabilities") or []
        if not probs:
            withheld += 1
            argmax_same += list(answer.get("tokens") or [None])[0] == int(ref.argmax())
            continue
        top = probs[0]["top_logprobs"]
        worst_lp = max(worst_lp, *(abs(t["logprob"] - ref[t["id"]].item()) for t in top))
        worst_p = max(worst_p, *(abs(math.exp(t["logprob"]) - math.exp(ref[t["id"]].item())) for t in top))
        argmax_same += top[0]["id"] == int(ref.argmax())
    tolerance = PROB_TOLERANCE.get(qtype.lower(), PROB_TOLERANCE_OTHER)
    return {
        "prompts": len(prompts),
        "top_k": TOP_K,
        "max_abs_prob_diff": worst_p,
        "max_abs_logprob_diff": worst_lp,
        "greedy_token_same": argmax_same,
        "probabilities_withheld": withheld,
        "tolerance": tolerance,
        "ok": worst_p <= tolerance and argmax_same == len(prompts) and withheld < len(prompts),
    }
