"""Round-to-nearest quantization: scales, zero points, clipping search, quantize/dequantize.

Conventions follow compressed-tensors: integers ``q`` lie in ``[qmin, qmax]`` (signed);
symmetric weights dequantize as ``q * scale``, asymmetric as ``(q - zero_point) * scale``.
Scales and zero points have shape ``[out, groups]`` (``groups == 1`` for per-channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferkit.quant.scheme import QuantFormat

# Shrink factors tried by the clipping search (1.0 = plain min/max), finest near 1.
SEARCH_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 … 0.5


@dataclass
class QuantizedWeight:
    """Integer weights plus the parameters to dequantize them."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out, groups] float32
    zero_point: torch.Tensor | None  # [out, groups] int8, None when symmetric
    fmt: QuantFormat

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero_point, self.fmt)


def _grouped(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    out, cols = w.shape
    size = fmt.group_size or cols
    return w.reshape(out, cols // size, size)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32):
    """Scale and zero point covering ``[lo, hi]`` (0 always representable).

    Scales are rounded to ``scale_dtype``, the dtype they are stored in, before the zero point
    and the integers are derived from them: what is quantized is exactly what is stored.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if fmt.symmetric:
        # Use the extra negative level: -qmin is one more than qmax.
        scale = torch.maximum(hi / fmt.qmax, -lo / -fmt.qmin)
        zero = None
    else:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_dtype != torch.float32:
        scale = scale.clamp(min=torch.finfo(scale_dtype).tiny, max=torch.finfo(scale_dtype).max).to(scale_dtype).float()
    if not fmt.symmetric:
        zero = torch.clamp(torch.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat) -> torch.Tensor:
    """Integers for ``w`` [..., n] given broadcastable ``scale``/``zero``; float dtype result."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return torch.clamp(q, fmt.qmin, fmt.qmax)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat) -> torch.Tensor:
    q = quantize_with(w, scale, zero, fmt)
    return (q - zero) * scale if zero is not None else q * scale


def find_qparams(w: torch.Tensor, fmt: QuantFormat, search: bool = False,
                 importance: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32):
    """Per-group scale and zero point for ``w`` [out, in]: min/max, or the clipping that
    minimises the (importance-weighted) squared error when ``search`` is set.

    ``importance`` [in] weights each input column, e.g. the Hessian diagonal.
    Returns ``scale`` [out, groups] and ``zero`` [out, groups] (None if symmetric).
    """
    g = _grouped(w.float(), fmt)  # [out, groups, size]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best_scale, best_zero = qparams_from_range(lo, hi, fmt, scale_dtype)
    if not search:
        return best_scale, best_zero
    imp = None if importance is None else _grouped(importance.float().reshape(1, -1), fmt)
    best_err = None
    for factor in SEARCH_GRID:
        scale, zero = qparams_from_range(lo * factor, hi * factor, fmt, scale_dtype)
        deq = fake_quantize(g, scale[..., None], None if zero is None else zero[..., None], fmt)
        err = (deq - g).pow_(2)
        err = (err * imp if imp is not None else err).sum(dim=-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_weight_rtn(w: torch.Tensor, fmt: QuantFormat, search: bool = False,
                        importance: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round every weight to the nearest level of its group's grid."""
    scale, zero = find_qparams(w, fmt, search, importance, scale_dtype)
    g = _grouped(w.float(), fmt)
    q = quantize_with(g, scale[..., None], None if zero is None else zero[..., None], fmt)
    return QuantizedWeight(
        q=q.reshape(w.shape).to(torch.int8),
        scale=scale,
        zero_point=None if zero is None else zero.to(torch.int8),
        fmt=fmt,
    )


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat) -> torch.Tensor:
    """Float32 weights [out, in] from integers and per-group parameters."""
    out, cols = q.shape
    size = fmt.group_size or cols
    g = q.float().reshape(out, cols // size, size)
    if zero is not None:
        g = g - zero.float()[..., None]
    return (g * scale.float()[..., None]).reshape(out, cols)
