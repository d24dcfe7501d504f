"""Perplexity on fixed token windows, and next-token KL divergence against a reference model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from inferkit.errors import InferkitError


@dataclass(frozen=True, slots=True)
class EvalWindows:
    """``count`` windows of ``size`` tokens, starting every ``stride`` tokens from the start."""

    size: int = 512
    count: int = 40
    stride: int | None = None  # None: non-overlapping (stride = size)

    def __post_init__(self) -> None:
        if self.size < 2 or self.count < 1:
            raise InferkitError(f"evaluation windows need size >= 2 and count >= 1, got {self.size} and {self.count}")
        if self.stride is not None and self.stride < 1:
            raise InferkitError(f"window stride must be positive, got {self.stride}")


def text_windows(tokenizer, text: str, windows: EvalWindows) -> torch.Tensor:
    """Token windows [count, size] cut from the tokenized ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    stride = windows.stride or windows.size
    available = 0 if ids.numel() < windows.size else (ids.numel() - windows.size) // stride + 1
    if available < windows.count:
        raise InferkitError(
            f"the text has {ids.numel()} tokens: room for {available} windows of {windows.size}, "
            f"not {windows.count}; lower --windows or --window-size"
        )
    return torch.stack([ids[i * stride : i * stride + windows.size] for i in range(windows.count)])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, batch_size: int = 4,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of ``model`` on ``windows`` [n, size]; with ``reference``, also the mean
    KL(reference ‖ model) of next-token distributions and top-1 agreement."""
    nll_sum = 0.0
    kl_sum = 0.0
    agree = 0
    tokens = 0
    done = 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()  # [b, size-1, vocab]
        logp = F.log_softmax(logits, dim=-1)
        target = batch[:, 1:]
        nll_sum += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
        tokens += target.numel()
        if reference is not None:
            ref_logp = F.log_softmax(reference(input_ids=batch).logits[:, :-1].float(), dim=-1)
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        done += batch.shape[0]
        if progress:
            progress(done, windows.shape[0])
    result = {"perplexity": math.exp(nll_sum / tokens), "nll": nll_sum / tokens, "tokens": tokens}
    if reference is not None:
        result["kl_divergence"] = kl_sum / tokens
        result["top1_agreement"] = agree / tokens
    return result
