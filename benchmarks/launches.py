"""Kernels launched per decode step by the runtime's Triton path: element-wise steps fused or not.

    python benchmarks/launches.py [--out benchmarks/results/launches.json]

At batch 1 a decode step reads each weight once; what else it costs is one launch per kernel,
a few microseconds each on a GPU even when replayed from a CUDA graph. This counts them on any
machine: the runtime runs a model with Llama-3.2-1B's layer structure (16 layers, grouped-query attention,
tied embeddings; narrow, random bf16 weights: the count depends on neither width nor heads) with the Triton backends
in Triton's CPU interpreter, and one decode step is counted twice: PyTorch operators that launch
a kernel on a GPU (views and reshapes launch none), and Triton kernel launches (the PyTorch work
the interpreter itself does inside a launch is not counted). Variants: the layer's element-wise
steps as Triton kernels (``inferkit.kernels.fused``, the default) and as PyTorch operators.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Operators that only make views, or metadata, on a GPU: no kernel
NO_KERNEL = {"view", "_unsafe_view", "slice", "select", "expand", "t", "transpose", "unsqueeze", "squeeze", "split",
             "chunk", "alias", "as_strided", "detach", "permute", "reshape", "split_with_sizes", "unbind",
             "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "unflatten",
             "flatten", "narrow"}

SHAPE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=16, num_attention_heads=8,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


class Counter(TorchDispatchMode):
    """PyTorch operators dispatched (outside Triton launches), and Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.triton: collections.Counter = collections.Counter()
        self.inside_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_launch and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_triton(counter_ref: list) -> None:
    """Count every Triton launch (``kernel[grid](...)``) while a Counter is active."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for cls in (InterpretedFunction, JITFunction):
        run = cls.run

        def counted(self, *args, _run=run, **kwargs):
            counter = counter_ref[0]
            if counter is None or kwargs.get("warmup"):
                return _run(self, *args, **kwargs)
            counter.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
            counter.inside_launch += 1
            try:
                return _run(self, *args, **kwargs)
            finally:
                counter.inside_launch -= 1

        cls.run = counted


def make_model(folder: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"])}  # any tokenizer: the benchmark feeds token ids
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t2").save_pretrained(folder)


def count_step(folder: Path, fused: bool, batch: int, counter_ref: list) -> dict:
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.runtime.model import RuntimeModel

    RuntimeModel.fuse_elementwise = fused
    try:
        llm = LLM(folder, device="cpu", dtype="bfloat16", linear_backend="torch", attention_backend="triton",
                  max_model_len=64, kv_cache_gb=0.01, cuda_graphs=False)
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for i in range(batch):
            engine.add_request([5 + i, 6 + i], params)
        engine.step()  # the prompts' prefill
        counted = []
        forward = engine.model.forward

        def counting_forward(*args):
            counter_ref[0] = Counter()
            with counter_ref[0]:
                out = forward(*args)
            counted.append(counter_ref[0])
            counter_ref[0] = None
            return out

        engine.model.forward = counting_forward
        engine.step()  # one decode step of every sequence
    finally:
        RuntimeModel.fuse_elementwise = True
    c = counted[-1]
    layers = SHAPE["num_hidden_layers"]
    total = sum(c.ops.values()) + sum(c.triton.values())
    return {"elementwise": "triton (fused)" if fused else "pytorch", "batch": batch, "kernels_per_step": total,
            "per_layer": total / layers, "pytorch_ops": dict(c.ops.most_common()), "triton_launches": dict(c.triton)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/launches.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    counter_ref: list = [None]
    count_triton(counter_ref)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-1b-layers"
        make_model(folder)
        for batch in (1, 4):
            for fused in (False, True):
                rows.append(count_step(folder, fused, batch, counter_ref))
    table = Table(title="Kernels per decode step, Llama-3.2-1B layer structure (16 layers), Triton backends")
    for col in ("element-wise steps", "batch", "kernels per step", "per layer", "most frequent"):
        table.add_column(col)
    for r in rows:
        top = collections.Counter({**r["pytorch_ops"], **r["triton_launches"]}).most_common(5)
        table.add_row(r["elementwise"], str(r["batch"]), str(r["kernels_per_step"]), f"{r['per_layer']:.1f}",
                      " ".join(f"{k}:{v}" for k, v in top))
    Console(width=160).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "Llama-3.2-1B layer structure, narrow", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
