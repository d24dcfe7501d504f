"""Per-request sampling settings and stop conditions."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferkit.errors import InferkitError


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: no top-k cut
    top_p: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop strings are ignored before this many tokens
    ignore_eos: bool = False
    seed: int | None = None  # a request with a seed samples the same tokens in any batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # return the sampled token's logprob and the top N per step

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not self.temperature >= 0:
            raise InferkitError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InferkitError(f"top_k must be a non-negative integer (0 or -1 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InferkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InferkitError(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InferkitError(f"min_tokens must be between 0 and max_tokens, got {self.min_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InferkitError("stop strings must be non-empty strings")
        if self.logprobs is not None and self.logprobs < 0:
            raise InferkitError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
