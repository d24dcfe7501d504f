"""Engine options, checked when the engine is made."""

from __future__ import annotations

from dataclasses import dataclass

from inferkit.errors import InferkitError

LINEAR_BACKENDS = ("auto", "torch", "packed", "reference", "triton")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # pool size in blocks; None: from kv_cache_gb
    kv_cache_gb: float = 1.0  # pool size as a memory budget, used when num_kv_blocks is None
    max_num_seqs: int = 64  # sequences in flight at once
    max_num_batched_tokens: int = 512  # tokens computed in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # prompt + output tokens; None: the model's context
    enable_prefix_caching: bool = True
    dtype: str = "float32"  # activations and unquantized weights: float32, bfloat16, float16
    device: str = "cpu"
    linear_backend: str = "auto"  # auto: triton on CUDA, packed on the CPU; torch: exact dequantize + matmul;
    # reference: unpack the stored words every call
    attention_backend: str = "auto"  # auto: triton on CUDA, else torch (SDPA over gathered blocks)
    cuda_graphs: bool = True  # on CUDA with the triton attention: replay captured decode steps
    pdl: bool = False  # triton linears on sm_90+: every quantized matmul a programmatic dependent launch
    num_threads: int | None = None  # torch intra-op threads on CPU; None: leave as is
    verify_hashes: bool = True  # check the artifact's files against its manifest on load
    draft: str | None = None  # a draft model folder: speculative decoding
    num_speculative_tokens: int = 4  # draft tokens proposed per step (with a draft)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InferkitError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InferkitError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_gb <= 0:
            raise InferkitError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.max_num_seqs < 1:
            raise InferkitError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise InferkitError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InferkitError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InferkitError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not isinstance(self.pdl, bool):
            raise InferkitError(f"pdl must be true or false, got {self.pdl!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise InferkitError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise InferkitError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InferkitError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                                f"got {self.attention_backend!r}")

    def backends(self) -> tuple[str, str]:
        """(linear, attention) backends for this device: auto means Triton on CUDA when Triton
        imports, PyTorch elsewhere; Triton on a CPU runs only under TRITON_INTERPRET=1."""
        import os

        import torch

        cuda = torch.device(self.device).type == "cuda"
        triton_ok = _triton_available()
        chosen = []
        for name, value in (("linear_backend", self.linear_backend), ("attention_backend", self.attention_backend)):
            if value == "auto":
                if cuda:
                    value = "triton" if triton_ok else "torch"
                else:
                    value = "packed" if name == "linear_backend" else "torch"
            elif value == "packed" and cuda:
                raise InferkitError("linear_backend=packed is PyTorch's CPU kernels; on CUDA use triton (or torch)")
            elif value == "triton":
                if not triton_ok:
                    raise InferkitError(f"{name}=triton needs the triton package (pip install triton)")
                if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                    raise InferkitError(f"{name}=triton needs a CUDA device (or TRITON_INTERPRET=1 to run "
                                        "the kernels in Triton's CPU interpreter)")
            chosen.append(value)
        if chosen[0] == "triton":
            from inferkit.kernels import tuned

            try:
                tuned.check_override()  # measured matmul tiles named by INFERKIT_KERNEL_CONFIGS
            except ValueError as exc:
                raise InferkitError(str(exc)) from None
        return chosen[0], chosen[1]

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise InferkitError(f"unknown engine option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**options)


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
