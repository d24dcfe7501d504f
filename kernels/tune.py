"""Tile tuning for the dequantizing matmul on the GPU at hand: ``inferkit tune-kernels``.

``pick_config``'s tiles are a heuristic, and the tables shipped in ``configs/`` cover the GPU
models and layer shapes someone measured. This module times candidate configs for a model's own
quantized layers (the shapes the runtime launches: q/k/v and gate/up fused where their formats
agree) at each row bucket, checks every config's output against a float32 reference before
timing it, and keeps the fastest per shape and bucket as a table for ``inferkit.kernels.tuned``.

Times are the kernels' own: calls captured in a CUDA graph and replayed, cycling through copies
of the weights large enough together to miss the L2 cache, as a decode step streams weights that
the previous step's other layers have evicted. With ``pdl`` (sm_90+), the fastest plain configs
are timed again as programmatic dependent launches, each call starting during the one before
(in the runtime, the kernel before a matmul is an RMSNorm, attention or SiLU kernel, which signal
at their start as the matmul does). Under ``TRITON_INTERPRET=1`` on a CPU the same
code runs with wall-clock times of single calls: a functional check of the command, not a
measurement.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

GRIDS = ("full", "quick", "smoke")
DEFAULT_ROWS = (1, 2, 3, 4, 16, 32, 64)  # one row count per bucket of inferkit.kernels.tuned
L2_MISS_BYTES = 256 * 2**20  # the copies of a layer's weights cycled through per timing
MAX_REL_ERR = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
PDL_TOP = 3  # with --pdl: the fastest plain configs timed again as programmatic dependent launches


@dataclass
class Problem:
    """One matmul shape the runtime launches, and the layers that launch it."""

    bits: int
    group: int  # inputs per scale; K when per channel (the tables' convention)
    N: int
    K: int
    packed: torch.Tensor  # int32 [N, K * bits / 32]
    scale: torch.Tensor
    zero: torch.Tensor | None
    bias: torch.Tensor | None
    layers: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.bits, self.group, self.N, self.K)

    @property
    def group_size(self) -> int | None:
        return None if self.group >= self.K else self.group

    @property
    def nbytes(self) -> int:
        parts = [self.packed, self.scale] + [t for t in (self.zero, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def label(self) -> str:
        fmt = f"int{self.bits}-" + ("ch" if self.group >= self.K else f"g{self.group}") + ("-asym" if self.zero is not None else "")
        return f"{self.N}x{self.K} {fmt}"

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] on the problem's device (the reference's)."""
        from inferkit.quant.pack import unpack_int32
        from inferkit.quant.rtn import dequantize
        from inferkit.quant.scheme import QuantFormat

        q = unpack_int32(self.packed.cpu(), self.bits, self.K, dim=1)
        fmt = QuantFormat(self.bits, self.group_size, symmetric=self.zero is None)
        zero = self.zero.cpu() if self.zero is not None else None
        return dequantize(q, self.scale.cpu(), zero, fmt).to(self.packed.device)


def model_problems(model) -> list[Problem]:
    """The distinct Triton-quantized matmuls of a runtime model (``RuntimeModel`` built with the
    triton linear backend), in layer order, each with the layer names that share it."""
    from inferkit.runtime.linear import TritonQuantLinear

    found: dict[tuple, Problem] = {}
    named = [(f"layers.{i}.{part}", getattr(layer, part)) for i, layer in enumerate(model.layers)
             for part in ("qkv", "o", "gate_up", "down")]
    named.append(("lm_head", model.lm_head))
    for name, lin in named:
        if not isinstance(lin, TritonQuantLinear):
            continue
        group = lin.group_size or lin.in_features
        p = Problem(lin.fmt.bits, group, lin.out_features, lin.in_features, lin.packed, lin.scale, lin.zero, lin.bias)
        found.setdefault(p.key, p).layers.append(name)
    return list(found.values())


def candidates(M: int, N: int, K: int, group: int, bits: int, device: torch.device, grid: str = "full") -> list[dict]:
    """Configs to time for one shape and row count, the heuristic's first. ``quick``: about a
    dozen to three dozen around the heuristic (``benchmarks/gpu.sh``'s sweep); ``full``: tiles,
    warps, load variants, prefetch and pipeline depths and splits over a wider range; ``smoke``:
    one tiny config per kernel. INT4 whose groups hold a K tile of 16 values or more
    (``swap_tile_k``) also tries the swap kernel (``KERNEL: swap``), in every grid."""
    from inferkit.kernels import tuned
    from inferkit.kernels.quant_matmul import gemv_tile_k, pick_config, swap_one_dot, swap_tile_k

    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    vals = 32 // bits
    picked = pick_config(M, N, K, group, device, bits)
    picked["VEC_X" if tuned.kernel_for(M, picked) == "gemv" else "ONE_DOT"] = True  # the kernels' defaults, spelled out
    gemv_bk, mma_bk = gemv_tile_k(K, group, bits), 16 * vals
    swap_bk = swap_tile_k(128, group, False) if bits == 4 else None  # None: the swap kernel cannot take it
    if grid == "smoke":
        kernels = ["gemv", "mma"] if M <= 4 else ["mma"]
        out = [dict(picked)]
        for kernel in kernels:
            bk = gemv_bk if kernel == "gemv" else mma_bk
            cfg = {"BN": 16, "BK": bk, "SPLIT_K": 2 if K >= 2 * bk else 1, "num_warps": 1}
            if kernel == "mma" and M <= 4:
                cfg["KERNEL"] = "mma"
            out.append(cfg)
        if swap_bk:
            out.append({"BN": 16, "BK": swap_bk, "SPLIT_K": 2 if K >= 2 * swap_bk else 1, "num_warps": 1,
                        "KERNEL": "swap"})
        return _unique(out)
    shapes: list[tuple] = []  # (kernel, BN, warps, variant, splits[, GEMV loop keys])
    if grid == "quick":
        if M == 1:
            shapes = [("gemv", bn, w, v, (1, 4, 8, 16)) for bn, w, v in
                      [(64, 2, True), (64, 4, True), (128, 4, True), (128, 8, True), (256, 8, True), (128, 4, False)]]
            # loading 2 tiles ahead into registers; the pipelined loop, 4 stages
            shapes += [("gemv", bn, w, True, (4, 8), ahead) for bn, w in [(64, 4), (128, 8)]
                       for ahead in ({"PREFETCH": 2}, {"STAGES": 4})]
        elif M <= 4:
            shapes = [("gemv", bn, w, True, (1, 4)) for bn, w in [(64, 2), (128, 4), (256, 8)]]
            shapes += [("mma", bn, 4, True, (1, 4)) for bn in (64, 128)]
        else:  # and the 64-wide tile pipelined in 4 stages (2 by default)
            shapes = [("mma", bn, 4, v, (1, 4, 8)) for bn, v in [(64, True), (128, True), (64, False)]]
            shapes += [("mma", 64, 4, True, (1, 4), {"STAGES": 4})]
    else:
        if M <= 4:
            for bn in (32, 64, 128, 256):
                for w in (2, 4, 8):
                    words = bn * gemv_bk // vals // (32 * w)  # packed words per thread per tile
                    if 1 <= words <= (16 if M == 1 else 8):
                        shapes.append(("gemv", bn, w, True, (1, 2, 4, 8, 16)))
            shapes.append(("gemv", picked["BN"], picked["num_warps"], False, (1, 2, 4, 8, 16)))
            if M <= 2:  # the picked tile loading 2 and 3 tiles ahead, and pipelined in 3 and 4 stages
                shapes += [("gemv", picked["BN"], picked["num_warps"], True, (1, 2, 4, 8, 16), ahead)
                           for ahead in ({"PREFETCH": 2}, {"PREFETCH": 3}, {"STAGES": 3}, {"STAGES": 4})]
            if M > 1:
                shapes += [("mma", bn, 4, True, (1, 2, 4)) for bn in (64, 128)]
        else:
            shapes = [("mma", bn, w, v, (1, 2, 4, 8)) for bn, w in [(32, 4), (64, 4), (128, 4), (128, 8)]
                      for v in (True, False)]
            shapes += [("mma", bn, 4, True, (1, 2, 4, 8), {"STAGES": st}) for bn in (64, 128) for st in (3, 4)]
    if swap_bk:  # the swap kernel (INT4 on the tensor cores, weights first), never a default
        if grid == "quick":
            shapes += [("swap", 128, 4, True, (1, 4, 8)), ("swap", 256, 8, True, (4, 8))]
        else:
            # a dot per value position only where it is 16 deep (swap_one_dot: else the joined tile again)
            shapes += [("swap", bn, w, v, (1, 2, 4, 8, 16)) for bn, w in [(64, 4), (128, 4), (256, 8), (256, 4)]
                       for v in (True, False) if swap_one_dot(v, swap_bk) is v]
    out = [dict(picked)]
    if M == 1 and tuned.kernel_for(M, picked) == "gemv":  # the heuristic's tiles without the register cap
        out.append({**picked, "REG_CAP": 0})
    for kernel, bn, warps, variant, splits, *ahead in shapes:
        bk = gemv_bk if kernel == "gemv" else swap_bk if kernel == "swap" else mma_bk
        for split in splits:
            if split > 1 and K < bk * split:  # every split gets at least one tile of inputs
                continue
            cfg = {"BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": warps,
                   ("VEC_X" if kernel == "gemv" else "ONE_DOT"): variant, **(ahead[0] if ahead else {})}
            if kernel == "mma" and M <= 4 or kernel == "swap":
                cfg["KERNEL"] = kernel
            out.append(cfg)
    return _unique(out)


def _unique(configs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for cfg in configs:
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def _l2_copies(nbytes: int) -> int:
    """Copies of ``nbytes`` of operands that together exceed ``L2_MISS_BYTES`` (1-64)."""
    return max(1, min(64, -(-L2_MISS_BYTES // max(nbytes, 1))))


def time_call(make_call, nbytes: int, device: torch.device) -> float:
    """Seconds per call, launch overhead removed. On CUDA: calls captured in a CUDA graph and
    replayed (Triton's Python launcher costs microseconds, about what a small kernel runs),
    cycling through ``make_call(i)`` for enough copies of the operands to exceed the L2 cache.
    On the CPU (the Triton interpreter): the wall time of one call."""
    if device.type != "cuda":
        start = time.perf_counter()
        make_call(0)()
        return time.perf_counter() - start
    copies = _l2_copies(nbytes)
    calls = [make_call(i) for i in range(copies)]
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize(device)
    reps = max(1, 32 // copies)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / (reps * copies))
    return statistics.median(times)


def operand_copies(problem: Problem, device: torch.device) -> list[tuple]:
    """(packed, scale, zero, bias) copies enough to miss L2 when cycled (one on the CPU)."""
    n = 1 if device.type != "cuda" else _l2_copies(problem.nbytes)
    first = (problem.packed, problem.scale, problem.zero, problem.bias)
    return [first] + [tuple(None if t is None else t.clone() for t in first) for _ in range(n - 1)]


def sweep(problem: Problem, M: int, dtype: torch.dtype, configs: list[dict], copies: list[tuple] | None = None,
          weight: torch.Tensor | None = None, seed: int = 0) -> list[dict]:
    """Time each config for ``M`` rows of ``dtype`` activations. A config whose output is off the
    float32 reference (relative error above ``MAX_REL_ERR``), or that fails to compile or launch,
    is reported with ``error`` and no time. Rows: the config, ``us``, ``rel_err``, ``error``."""
    from inferkit.kernels.quant_matmul import quant_matmul

    device = problem.packed.device
    copies = copies or operand_copies(problem, device)
    weight = problem.dequantized() if weight is None else weight
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, problem.K, generator=g).to(device=device, dtype=dtype)
    ref = x.float() @ weight.T
    if problem.bias is not None:
        ref += problem.bias.float()
    rows = []
    for cfg in configs:
        row = {**cfg, "us": None, "rel_err": None, "error": None}
        try:
            got = quant_matmul(x, problem.packed, problem.scale, problem.zero, problem.bits, problem.group_size,
                               problem.bias, config=cfg).float()
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            row["rel_err"] = err
            if not err <= MAX_REL_ERR[dtype]:
                row["error"] = f"wrong output: relative error {err:.3g}"
            else:
                def make(i, cfg=cfg):
                    w, s, z, b = copies[i % len(copies)]
                    return lambda: quant_matmul(x, w, s, z, problem.bits, problem.group_size, b, config=cfg)

                row["us"] = time_call(make, problem.nbytes, device) * 1e6
        except Exception as exc:  # a config this GPU cannot run (shared memory, registers)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
    return rows


def _config(row: dict) -> dict:
    """The config of a sweep row (its table keys, without the time and error)."""
    from inferkit.kernels import tuned

    return {k: row[k] for k in tuned.TILE + tuned.OPTIONAL if k in row}


def pdl_variants(rows: list[dict], top: int = PDL_TOP) -> list[dict]:
    """The ``top`` fastest correct plain configs of a sweep, each as a programmatic dependent
    launch (``PDL``), to time after them: back to back, each call then starts during the one
    before it."""
    timed = sorted((r for r in rows if r["us"] is not None and not r.get("PDL")), key=lambda r: r["us"])
    return [{**_config(r), "PDL": True} for r in timed[:top]]


def best_entry(problem: Problem, M: int, rows: list[dict]) -> dict | None:
    """The table entry for the fastest correct config (``heuristic_us``: the heuristic's time;
    ``plain_us``, when a PDL launch is the fastest: the fastest plain launch's)."""
    timed = [r for r in rows if r["us"] is not None]
    if not timed:
        return None
    best = min(timed, key=lambda r: r["us"])
    entry = {"bits": problem.bits, "group": problem.group, "K": problem.K, "N": problem.N, "M": M,
             **_config(best),
             "us": round(best["us"], 2)}
    if rows[0]["us"] is not None:  # candidates() puts the heuristic's config first
        entry["heuristic_us"] = round(rows[0]["us"], 2)
    plain = [r["us"] for r in timed if not r.get("PDL")]
    if best.get("PDL") and plain:
        entry["plain_us"] = round(min(plain), 2)
    return entry


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Entries of ``old`` not measured again, then ``new``, sorted by shape and rows."""
    from inferkit.kernels import tuned

    def key(e):
        return (e["bits"], e["group"], e["N"], e["K"], tuned.bucket(e["M"]))

    fresh = {key(e) for e in new}
    return sorted([e for e in old if key(e) not in fresh] + new, key=lambda e: key(e) + (e["M"],))
