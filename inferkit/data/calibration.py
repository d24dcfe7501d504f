"""Turn a calibration source into fixed token windows, reproducibly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inferkit.data import sources
from inferkit.errors import InferkitError


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    """``source``: a registry name (``builtin``), a local file, or a hub dataset ``NAME[:CONFIG]``."""

    source: str = "builtin"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    split: str = "train"
    apply_chat_template: bool = True
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InferkitError(f"number of calibration samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 8:
            raise InferkitError(f"calibration sequence length must be at least 8, got {self.seq_len}")


def load_documents(cfg: CalibrationConfig) -> list[sources.Document]:
    """Documents of the configured source and split, in a fixed order."""
    if cfg.source in sources.registry():
        docs = sources.split_documents(sources.builtin_documents(cfg.source), cfg.split)
    elif Path(cfg.source).expanduser().exists():
        docs = sources.split_documents(sources.file_documents(Path(cfg.source).expanduser(), cfg.text_field), cfg.split)
    elif cfg.source.endswith((".txt", ".jsonl", ".json", ".parquet")):
        raise InferkitError(f"calibration file {cfg.source} does not exist")
    else:
        docs = sources.hub_documents(cfg.source, "train" if cfg.split == "train" else cfg.split, cfg.text_field)
    if not docs:
        raise InferkitError(f"calibration source {cfg.source!r} has no documents in split {cfg.split!r}")
    return docs


def render(doc: sources.Document, tokenizer, apply_chat_template: bool) -> str:
    """Chat records go through the tokenizer's chat template when it has one."""
    if isinstance(doc, str):
        return doc
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(doc, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in doc)


def token_stream(cfg: CalibrationConfig, tokenizer) -> torch.Tensor:
    """All documents tokenized and joined with the end-of-sequence token: [tokens] int64."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in load_documents(cfg):
        ids.extend(tokenizer(render(doc, tokenizer, cfg.apply_chat_template), add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.int64)


def build_samples(cfg: CalibrationConfig, tokenizer) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets: [n, seq_len]."""
    stream = token_stream(cfg, tokenizer)
    if stream.numel() < cfg.seq_len:
        raise InferkitError(
            f"calibration source {cfg.source!r} has {stream.numel()} tokens, fewer than one window of {cfg.seq_len}"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len + 1, (cfg.num_samples,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
