"""The mixed-precision planner: exact on small problems, deterministic, clear errors."""

import itertools
import random

import pytest

from inferkit.errors import InferkitError
from inferkit.quant.planner import Unit, bpw_range, make_units, solve
from inferkit.quant.scheme import QuantFormat

FORMATS = {"int8-ch-sym": QuantFormat(8, None), "int4-g32-sym": QuantFormat(4, 32), "int4-g64-sym": QuantFormat(4, 64),
           "int4-g128-sym": QuantFormat(4, 128)}


def _problem(seed: int, n_units: int = 5):
    rng = random.Random(seed)
    units = [Unit(f"model.layers.{i}.u", ("a",), ((rng.choice([64, 128, 192]), rng.choice([128, 256])),)) for i in range(n_units)]
    costs = {}
    for u in units:
        base = rng.uniform(0.1, 10)
        costs[u.name] = {"int8-ch-sym": base * 1e-3, "int4-g32-sym": base * rng.uniform(0.5, 1),
                         "int4-g64-sym": base * rng.uniform(1, 1.5), "int4-g128-sym": base * rng.uniform(1.5, 2)}
    return units, costs


def _brute(units, costs, scale_bits, budget=None, max_cost=None):
    best = None
    for combo in itertools.product(*[[f for f in FORMATS if u.fits(FORMATS[f])] for u in units]):
        bits = sum(u.bits(FORMATS[f], scale_bits) for u, f in zip(units, combo))
        cost = sum(costs[u.name][f] for u, f in zip(units, combo))
        if budget is not None and bits <= budget:
            key = (cost, bits)
        elif max_cost is not None and cost <= max_cost:
            key = (bits, cost)
        else:
            continue
        if best is None or key < best[0]:
            best = (key, combo)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    units, costs = _problem(seed)
    lo, hi = bpw_range(units, costs, FORMATS, 16)
    target = random.Random(seed).uniform(lo, hi)
    numel = sum(u.numel for u in units)
    result = solve(units, costs, FORMATS, 16, target_bpw=target)
    (cost, bits), combo = _brute(units, costs, 16, budget=int(target * numel))
    assert result.cost == pytest.approx(cost, rel=1e-12) and result.bits == bits
    assert result.bpw <= target
    assert result.grid_slack_bpw == 0.0  # small problems: exact grid


@pytest.mark.parametrize("seed", range(6))
def test_max_cost_gives_fewest_bits(seed):
    units, costs = _problem(seed)
    cap = sum(min(r.values()) for r in costs.values()) * 3
    result = solve(units, costs, FORMATS, 16, max_cost=cap)
    (bits, cost), _ = _brute(units, costs, 16, max_cost=cap)
    assert result.bits == bits and result.cost <= cap


def test_large_budget_uses_the_grid_and_stays_within_it():
    units = [Unit(f"model.layers.{i}.mlp.down_proj", (f"model.layers.{i}.mlp.down_proj",), ((4096, 11008),)) for i in range(40)]
    rng = random.Random(0)
    costs = {u.name: {"int8-ch-sym": rng.uniform(0, 1e-3), "int4-g32-sym": rng.uniform(1, 2), "int4-g128-sym": rng.uniform(2, 4)} for u in units}
    fmts = {k: FORMATS[k] for k in ("int8-ch-sym", "int4-g32-sym", "int4-g128-sym")}
    result = solve(units, costs, fmts, 16, target_bpw=5.0)
    assert result.bpw <= 5.0 and result.bpw > 5.0 - result.grid_slack_bpw - 1.5  # within the budget, not wasteful
    assert result.grid_slack_bpw < 0.01
    again = solve(units, costs, fmts, 16, target_bpw=5.0)
    assert again.choice == result.choice


def test_targets_out_of_range_are_clear_errors():
    units, costs = _problem(0)
    lo, hi = bpw_range(units, costs, FORMATS, 16)
    with pytest.raises(InferkitError, match=r"below the smallest plan"):
        solve(units, costs, FORMATS, 16, target_bpw=lo - 0.1)
    with pytest.raises(InferkitError, match=r"above the largest plan"):
        solve(units, costs, FORMATS, 16, target_bpw=hi + 0.1)
    with pytest.raises(InferkitError, match="no plan reaches a cost"):
        solve(units, costs, FORMATS, 16, max_cost=0.0)
    with pytest.raises(InferkitError, match="no entry for"):
        solve(units, {}, FORMATS, 16, target_bpw=5)


def test_ties_prefer_the_first_listed_format_then_fewer_bits():
    u = Unit("model.layers.0.x", ("x",), ((64, 128),))
    costs = {u.name: {"int4-g32-sym": 1.0, "int4-g64-sym": 1.0, "int8-ch-sym": 1.0}}
    result = solve([u], costs, FORMATS, 16, target_bpw=8.1)
    assert result.choice[u.name] == "int4-g64-sym"  # equal cost: fewest bits


def test_units_tie_fused_projections():
    shapes = {f"model.layers.0.self_attn.{p}": (64, 64) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update({f"model.layers.0.mlp.{p}": (96, 64) for p in ("gate_proj", "up_proj")})
    shapes["model.layers.0.mlp.down_proj"] = (64, 96)
    units = make_units(shapes)
    assert [u.name for u in units] == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                                       "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    assert units[0].members == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    assert len(make_units(shapes, tie=False)) == 7
    assert not units[3].fits(QuantFormat(4, 64)) and units[3].fits(QuantFormat(4, 32))
