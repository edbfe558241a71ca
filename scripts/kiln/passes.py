"""Evaluation's passes over a loaded model: the loss at the assistant tokens, batched greedy
generation, and both in one pass where the tokenized rows are the prompts followed by the answers."""

from __future__ import annotations

import math

from kiln.progress import progress


def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, desc: str = "") -> list[str]:
    """Batched greedy generation (left padding), stopping at the end-of-turn token."""
    import torch

    tokenizer.padding_side = "left"
    outputs = []
    bar = progress(len(prompts), f"evaluate {desc}: generation".replace("  ", " "))
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        bar.update(len(prompts[i : i + batch_size]))
    bar.close()
    return outputs


def masked_loss(model, tokenized_test, pad_id: int, batch_size: int = 16) -> dict:
    """Mean negative log-likelihood of the trainable (assistant) tokens, and its perplexity."""
    import torch

    from kiln.losses import summed_nll, takes_logits_to_keep

    selective = takes_logits_to_keep(model)
    total, count = 0.0, 0
    for i in range(0, len(tokenized_test), batch_size):
        rows = tokenized_test[i : i + batch_size]
        length = max(len(x) for x in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), length), pad_id)
        labels = torch.full_like(ids, -100)
        attn = torch.zeros_like(ids)
        for j, (x, m) in enumerate(zip(rows["input_ids"], rows["assistant_masks"], strict=True)):
            ids[j, : len(x)] = torch.tensor(x)
            attn[j, : len(x)] = 1
            labels[j, : len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
        shift = labels[:, 1:]
        # Only the positions whose next token is scored go through the LM head (the union over the
        # batch's rows): the answer tokens, not the prompt (see kiln.losses.labelled_positions_loss).
        keep = (shift != -100).any(dim=0).nonzero().squeeze(1) if selective else None
        if keep is not None and keep.numel() == 0:
            continue
        with torch.no_grad():
            extra = {"logits_to_keep": keep.to(model.device)} if keep is not None else {}
            logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), **extra).logits
        logits = logits if keep is not None else logits[:, :-1]
        nll, scored = summed_nll(logits, (shift[:, keep] if keep is not None else shift).to(model.device))
        total += nll.item()
        count += int(scored)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": count}


def shared_prompt_rows(tokenized_test, prompts: list[str], rows, tokenizer) -> list[tuple] | None:
    """(prompt ids, answer ids, answer mask) for each generated row when its tokenized test row is
    that prompt's tokens followed by the answer: the loss forward then holds the prompt, and
    generation continues from its cache (kiln.passes.loss_and_generate). None where they do not
    line up (other rows scored than generated, a truncated prompt): each is computed on its own."""
    if len(tokenized_test) != len(prompts) or not prompts:
        return None
    if "kiln_id" in tokenized_test.column_names and list(tokenized_test["kiln_id"]) != [r["kiln_id"] for r in rows]:
        return None
    out = []
    for prompt, ids, mask in zip(prompts, tokenized_test["input_ids"], tokenized_test["assistant_masks"], strict=True):
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(head)
        if not 0 < n < len(ids) or list(ids[:n]) != head or any(mask[:n]):
            return None
        out.append((head, list(ids[n:]), list(mask[n:])))
    return out


def _plain_cache(cache) -> bool:
    """A cache whose every layer is a plain full-attention one: cropping it gives the prompt's own."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def loss_and_generate(
    model, tokenizer, shared: list[tuple], batch_size: int, max_new_tokens: int, desc: str = ""
) -> tuple[dict, list[str]]:
    """masked_loss and generate in one pass over each batch: the prompts, left-padded to one length,
    then the reference answers. One forward scores the answers (their positions only through the
    LM head) and leaves the prompts' keys and values in the cache; greedy generation continues
    from there, so no prompt is run through the model twice (the prompt forward was a fifth of an
    HF model's evaluation on the 2-core CPU). Models whose cache is not plain full attention
    (sliding windows, linear attention) prefill the prompts again."""
    import torch

    from kiln.losses import summed_nll, takes_logits_to_keep

    selective = takes_logits_to_keep(model)
    pad = tokenizer.pad_token_id
    total, count, outputs = 0.0, 0, []
    bar = progress(len(shared), f"evaluate {desc}: loss and generation".replace("  ", " "))
    for i in range(0, len(shared), batch_size):
        chunk = shared[i : i + batch_size]
        P = max(len(p) for p, _, _ in chunk)
        A = max(len(a) for _, a, _ in chunk)
        ids = torch.full((len(chunk), P + A), pad)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (p, a, m) in enumerate(chunk):
            ids[j, P - len(p) : P] = torch.tensor(p)
            ids[j, P : P + len(a)] = torch.tensor(a)
            attn[j, P - len(p) : P + len(a)] = 1
            labels[j, P : P + len(a)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(a), -100)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        shift = labels[:, 1:]
        keep = (shift != -100).any(dim=0).nonzero().squeeze(1)
        dev = model.device
        with torch.no_grad():
            out = model(
                input_ids=ids.to(dev),
                attention_mask=attn.to(dev),
                position_ids=positions.to(dev),
                use_cache=True,
                **({"logits_to_keep": keep.to(dev)} if selective else {}),
            )
        logits = out.logits if selective else out.logits[:, keep]
        nll, scored = summed_nll(logits, shift[:, keep].to(dev))
        total += nll.item()
        count += int(scored)
        cache = out.past_key_values
        del out, logits
        extra = {}
        if _plain_cache(cache):
            cache.crop(-(A + 1))  # the prompts' keys and values, all but the last prompt token's
            extra["past_key_values"] = cache
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids[:, :P].to(dev),
                attention_mask=attn[:, :P].to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                **extra,
            )
        outputs += tokenizer.batch_decode(gen[:, P:], skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": count}, outputs
