"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian.

Pure function on tensors; the orchestration that gathers Hessians lives in
``inferkit.stages``. ``H`` is the input second moment ``XᵀX`` ([in, in], any positive scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferkit.errors import InferkitError
from inferkit.quant.rtn import QuantizedWeight, find_qparams
from inferkit.quant.scheme import QuantFormat


@dataclass(frozen=True, slots=True)
class GPTQConfig:
    """Solver settings: relative damping, lazy-update block size, activation ordering,
    clipping search for group scales."""

    damp: float = 0.01
    block_size: int = 128
    actorder: bool = False
    scale_search: bool = False
    scale_dtype: torch.dtype = torch.float32  # scales are rounded to what they are stored in

    def __post_init__(self) -> None:
        if not 0.0 <= self.damp < 1.0:
            raise InferkitError(f"GPTQ damping must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise InferkitError(f"GPTQ block size must be positive, got {self.block_size}")


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (damped), the form the column updates need."""
    h = h.clone()
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        # Not positive definite in float precision: add more damping and retry.
        h[diag, diag] += (10 ** attempt) * 1e-2 * torch.mean(torch.diag(h)).clamp(min=1e-8)
    else:
        raise InferkitError("Hessian is not positive definite even after extra damping; add calibration samples")
    hinv = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(hinv, upper=True)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat,
                  config: GPTQConfig = GPTQConfig()) -> tuple[QuantizedWeight, float]:
    """Quantize ``w`` [out, in] against Hessian ``h`` [in, in].

    Returns the quantized weight and the GPTQ proxy loss ``Σ err² / d`` (for reporting).
    With activation ordering, group parameters are fixed from the original weights before
    reordering ("static groups"), so the stored layout needs no ``g_idx``.
    """
    out_features, cols = w.shape
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = fmt.group_size or cols
    num_groups = cols // group
    importance = torch.diag(h) if config.scale_search else None

    scale = torch.zeros(out_features, num_groups)
    zero = None if fmt.symmetric else torch.zeros(out_features, num_groups)
    static = config.actorder or fmt.group_size is None
    if static:
        s, z = find_qparams(w, fmt, config.scale_search, importance, config.scale_dtype)
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)

    perm = torch.argsort(torch.diag(h), descending=True) if config.actorder else torch.arange(cols)
    w = w[:, perm]
    h = h[perm][:, perm]
    col_group = perm // group  # group of each processed column, in original numbering
    hinv = _inverse_hessian_factor(h, config.damp)

    # Groups must not straddle blocks when their parameters are found on the fly.
    block = config.block_size if static else max(group, config.block_size // group * group)
    q_all = torch.zeros_like(w)
    loss = torch.zeros(())
    zero_or_0 = zero if zero is not None else torch.zeros_like(scale)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(col_group[col])
            if not static and col % group == 0:
                imp = None if importance is None else importance[perm[col:col + group]]
                s, z = find_qparams(w1[:, i:i + group], fmt, config.scale_search, imp, config.scale_dtype)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            sg, zg = scale[:, g], zero_or_0[:, g]
            wcol = w1[:, i]
            q = torch.clamp(torch.round(wcol / sg) + zg, fmt.qmin, fmt.qmax)
            q_all[:, col] = q
            err = (wcol - (q - zg) * sg) / hinv1[i, i]
            # Spread this column's error over the rest of the block: rank-1 update.
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = err
        loss += err1.pow(2).sum() / 2
        # Lazy batch update of all later columns: [out, b] @ [b, rest].
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)

    inv = torch.argsort(perm)
    q_int = q_all[:, inv].to(torch.int8)
    result = QuantizedWeight(q_int, scale, None if zero is None else zero.to(torch.int8), fmt)
    return result, float(loss)
