"""One request as the engine tracks it: its tokens, its KV blocks and its progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from inferkit.runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, found in the prefix cache at admission
    num_draft_computed: int = 0  # tokens whose K/V are in the draft model's cache
    finish_reason: str | None = None  # "length", "stop", "eos", "error"
    stop_text_len: int | None = None  # where a stop string cut the text
    logprobs: list[dict[int, float]] = field(default_factory=list)
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    # Wall-clock times (perf_counter seconds) for latency metrics.
    arrival_time: float = 0.0
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
