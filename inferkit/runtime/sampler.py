"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, seeded per request."""

from __future__ import annotations

import torch

from inferkit.runtime.sequence import Sequence


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution [V] after temperature, top-k and top-p (nucleus) cuts."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [len(seqs), V] float32, on any device → one token per sequence; logprobs recorded
    on request. Greedy choices are made where the logits are (only the ids are copied); rows
    that sample or report logprobs are copied to the CPU first, where the per-request seeded
    generators live, so a seed gives the same tokens on every device."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, seq in enumerate(seqs):
        p = seq.params
        row = logits[i].cpu() if not p.greedy or p.logprobs is not None else None
        if p.greedy:
            token = greedy[i]
        else:
            probs = filtered_probs(row, p.temperature, p.top_k, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        if p.logprobs is not None:
            seq.logprobs.append(logprob_entry(row, token, p.logprobs))
        tokens.append(token)
    return tokens


def logprob_entry(logits: torch.Tensor, token: int, top_n: int) -> dict[int, float]:
    """The chosen token's log-probability and the top ``top_n``, from the model's raw logits [V]."""
    logp = torch.log_softmax(logits, dim=-1)
    entry = {token: float(logp[token])}
    if top_n:
        top = torch.topk(logp, top_n)
        entry.update(zip(top.indices.tolist(), top.values.tolist()))
    return entry
