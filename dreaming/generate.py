"""Sampling text from a causal LM in large batches with the KV cache, the same whatever the batching.

`sample_continuations` is what the default corpus is written with. Each prompt draws its randomness from its
own stream (one uniform number per new token, from a generator seeded by (seed, prompt key)), and a token is
picked by inverse-CDF sampling over the top-k tokens of its own logits. So a prompt's continuation depends only
on the prompt, its key, the seed and the model's logits for that row: never on which other prompts share its
batch, the batch size, or the order of the list. (Hugging Face's `generate` draws from one global stream, so
its samples change when the batch does.)
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm


def _uniforms(seed: int, key: int, n: int) -> torch.Tensor:
    """n uniform numbers in [0, 1) that depend only on (seed, key)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63))
    return torch.rand(n, generator=generator, dtype=torch.float64)


def pick_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Inverse-CDF sampling over the top-k tokens of each row: logits [batch, vocab], uniforms [batch] in [0, 1).
    A row's token depends only on its own logits and uniform number, so it is the same in any batch; nothing
    leaves the logits' device."""
    top_k = min(top_k, logits.shape[-1])
    values, indices = logits.float().topk(top_k, dim=-1)  # [batch, k], sorted, largest first
    probs = torch.softmax(values.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    choice = (cdf < uniforms[:, None] * cdf[:, -1:]).sum(-1).clamp_max(top_k - 1)  # [batch]
    return indices.gather(1, choice[:, None]).squeeze(1)


@torch.no_grad()
def _sample_batch(model, prompts: list[list[int]], uniforms: torch.Tensor, max_new_tokens: int, eos: set[int],
                  pad_id: int, temperature: float, top_k: int) -> list[list[int]]:
    """Continue left-padded prompts token by token with the KV cache; stop a row at its first EOS."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # [batch, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # transformers >= 5.2x names the KV cache `cache` (was `past_key_values`), in the arguments and the output
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = getattr(out, cache_argument), out.logits[:, -1]
    new = torch.zeros(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos_ids = torch.tensor(sorted(eos), device=device)
    for step in range(max_new_tokens):
        token = pick_tokens(logits, uniforms[:, step].to(device), temperature, top_k)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new = torch.cat([new, token[:, None]], dim=1)
        done |= torch.isin(token, eos_ids)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_argument: cache})
        cache, logits = getattr(out, cache_argument), out.logits[:, -1]
    rows = []
    for row in new.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row if stop is None else row[: stop + 1])
    return rows


def sample_continuations(model, prompts: list[list[int]], *, keys: list[int] | None = None, seed: int = 0,
                         max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 50,
                         eos_token_ids: set[int] | list[int] = (), pad_token_id: int = 0, batch_size: int = 128,
                         progress: bool = True, desc: str = "sampling") -> list[list[int]]:
    """Sampled continuations (token ids, ending with the EOS when one was drawn) of tokenised prompts.

    keys: one integer per prompt naming its random stream (default: its position in the list); a prompt with
    the same key, seed and logits gets the same continuation in any batch. Prompts are run in batches of
    similar length (sorted by length, so little padding), and returned in the order given.
    """
    if temperature <= 0 or top_k < 1:
        raise ValueError(f"need temperature > 0 and top_k >= 1, got {temperature} and {top_k}")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    eos = set(eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[list[int] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="text", disable=not progress)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        uniforms = torch.stack([_uniforms(seed, keys[i], max_new_tokens) for i in chosen])  # [batch, new]
        rows = _sample_batch(model, [prompts[i] for i in chosen], uniforms, max_new_tokens, eos, pad_token_id,
                             temperature, top_k)
        for i, row in zip(chosen, rows):
            results[i] = row
        bar.update(len(chosen))
    bar.close()
    return results
