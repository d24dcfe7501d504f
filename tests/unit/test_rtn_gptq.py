import pytest
import torch

from inferkit.errors import InferkitError
from inferkit.quant.gptq import GPTQConfig, gptq_quantize
from inferkit.quant.rtn import dequantize, find_qparams, quantize_weight_rtn
from inferkit.quant.scheme import QuantFormat, parse_format

FORMATS = [QuantFormat(4, 32, True), QuantFormat(4, 64, False), QuantFormat(8, None, True), QuantFormat(4, None, False)]


def layer(seed=0, out=48, cols=128, tokens=1024):
    gen = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel scales, like real activations.
    x = torch.randn(tokens, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.2
    x = x * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(out, cols, generator=gen)
    return w, x


def output_error(x, w, wq):
    return float((x @ (w - wq).t()).norm())


def test_symmetric_int4_uses_the_extra_negative_level():
    w = torch.tensor([[-8.0, 1.0, 2.0, 3.0] * 8])
    qw = quantize_weight_rtn(w, QuantFormat(4, 32, True))
    assert float(qw.scale[0, 0]) == pytest.approx(1.0)
    assert int(qw.q.min()) == -8
    assert torch.allclose(qw.dequantize(), w)


def test_asymmetric_grid_reproduces_an_exact_min_max_grid():
    # Values on a 16-level grid from -0.3 upward: asymmetric INT4 is lossless here.
    w = (torch.arange(32) % 16).float().reshape(1, 32) * 0.1 - 0.3
    qw = quantize_weight_rtn(w, QuantFormat(4, 32, False))
    assert qw.zero_point is not None and qw.zero_point.dtype == torch.int8
    assert torch.allclose(qw.dequantize(), w, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_rtn_error_bounded_by_half_a_step(fmt):
    w, _ = layer()
    qw = quantize_weight_rtn(w, fmt)
    size = fmt.group_size or w.shape[1]
    step = qw.scale.repeat_interleave(size, dim=1)
    assert bool(((w - qw.dequantize()).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_clipping_search_never_worse_than_min_max(fmt):
    w, x = layer(1)
    imp = (x * x).sum(0)
    plain = quantize_weight_rtn(w, fmt).dequantize()
    searched = quantize_weight_rtn(w, fmt, search=True, importance=imp).dequantize()
    err = lambda d: float(((w - d) ** 2 * imp).sum())  # noqa: E731
    assert err(searched) <= err(plain) + 1e-6


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("cfg", [GPTQConfig(), GPTQConfig(actorder=True), GPTQConfig(scale_search=True)],
                         ids=["plain", "actorder", "search"])
def test_gptq_beats_rtn_on_output_error(fmt, cfg):
    w, x = layer(2)
    rtn = quantize_weight_rtn(w, fmt).dequantize()
    qw, loss = gptq_quantize(w, x.t() @ x, fmt, cfg)
    assert loss > 0
    assert output_error(x, w, qw.dequantize()) < 0.9 * output_error(x, w, rtn)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_gptq_identity_hessian_zero_damping_equals_rtn(fmt):
    w, _ = layer(3)
    qw, _ = gptq_quantize(w, torch.eye(w.shape[1]), fmt, GPTQConfig(damp=0.0))
    rtn = quantize_weight_rtn(w, fmt)
    assert torch.equal(qw.q, rtn.q)
    assert torch.equal(qw.scale, rtn.scale)


def test_gptq_static_groups_keep_original_layout():
    # With activation order the groups stay contiguous in the original column order:
    # dequantizing with plain per-group scales reproduces GPTQ's own result.
    w, x = layer(4)
    fmt = QuantFormat(4, 32, False)
    qw, _ = gptq_quantize(w, x.t() @ x, fmt, GPTQConfig(actorder=True))
    assert qw.scale.shape == (48, 4)
    assert torch.equal(dequantize(qw.q, qw.scale, qw.zero_point, fmt), qw.dequantize())
    rtn = quantize_weight_rtn(w, fmt)
    assert torch.equal(qw.scale, rtn.scale)  # static groups: parameters from the original weights


def test_gptq_dead_inputs_are_zeroed():
    w, x = layer(5)
    x[:, 7] = 0
    qw, _ = gptq_quantize(w, x.t() @ x, QuantFormat(8, None, True))
    assert bool((qw.dequantize()[:, 7] == 0).all())


def test_qparams_shapes():
    w, _ = layer(6)
    scale, zero = find_qparams(w, QuantFormat(4, 64, False))
    assert scale.shape == zero.shape == (48, 2)
    scale, zero = find_qparams(w, QuantFormat(8, None, True))
    assert scale.shape == (48, 1) and zero is None


def test_format_names_and_storage():
    assert parse_format("int4-g64-sym") == QuantFormat(4, 64, True)
    assert parse_format("w4-g32-asym") == QuantFormat(4, 32, False)
    assert parse_format("int8-ch-sym") == QuantFormat(8, None, True)
    assert QuantFormat(4, 64, True).storage_bits(576, 576) == 576 * 576 * 4 + 576 * 9 * 32
    assert QuantFormat(4, 64, False).storage_bits(576, 576, 16) == 576 * 576 * 4 + 576 * 9 * (16 + 4)
    with pytest.raises(InferkitError, match="cannot read format"):
        parse_format("fp4")


def test_group_that_does_not_divide_names_layer_and_options():
    with pytest.raises(InferkitError) as err:
        QuantFormat(4, 128, True).check_divides("model.layers.0.mlp.down_proj", 576)
    msg = str(err.value)
    assert "model.layers.0.mlp.down_proj" in msg and "576" in msg and "[32, 64]" in msg


def test_scales_rounded_to_their_storage_dtype():
    from inferkit.quant.rtn import quantize_weight_rtn
    from inferkit.quant.scheme import QuantFormat

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        qw = quantize_weight_rtn(w, QuantFormat(4, 32, False), search=True, scale_dtype=dtype)
        assert torch.equal(qw.scale, qw.scale.to(dtype).float())  # exactly representable
        ref = quantize_weight_rtn(w, QuantFormat(4, 32, False), search=True)
        # rounding the scale costs (almost) nothing in error
        err, err_ref = (qw.dequantize() - w).pow(2).sum(), (ref.dequantize() - w).pow(2).sum()
        assert err <= err_ref * 1.05
