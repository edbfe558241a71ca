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
            body |= {"n_probs": n_probs}
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
