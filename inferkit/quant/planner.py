"""Mixed-precision planning: one format per unit, least summed sensitivity within a bit budget.

A *unit* is the set of linears that must share a format: by default the projections a serving
engine fuses into one matrix (q/k/v, gate/up), as vLLM does, else each linear alone. Each unit
has candidate formats with a measured cost (sensitivity) and an exact storage size in bits
(values, scales and zero points). The planner solves the multiple-choice knapsack

    minimise Σ cost(u, f_u)   subject to   Σ bits(u, f_u) ≤ budget

by dynamic programming over the budget in quanta of the greatest common divisor of all sizes,
which is exact. Should that grid exceed ``STEPS`` cells, the quantum grows to budget/STEPS and
every size is rounded *up* to whole quanta, so a plan never exceeds the budget; the slack this
can cost is at most one quantum per unit (reported as ``grid_slack_bpw``, 0 when exact). Ties go to the candidate listed
first and then to the smaller budget, so the same inputs always give the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inferkit.errors import InferkitError
from inferkit.quant.scheme import QuantFormat

STEPS = 1 << 19
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@dataclass(frozen=True)
class Unit:
    name: str
    members: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # [out, in] of each member

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.shapes)

    def fits(self, fmt: QuantFormat) -> bool:
        return all(fmt.group_size is None or i % fmt.group_size == 0 for _, i in self.shapes)

    def bits(self, fmt: QuantFormat, scale_bits: int) -> int:
        return sum(fmt.storage_bits(o, i, scale_bits) for o, i in self.shapes)


def make_units(shapes: dict[str, tuple[int, int]], tie: bool = True) -> list[Unit]:
    """Group linears (name → [out, in], in model order) into planning units."""
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parent, _, leaf = name.rpartition(".")
        key = f"{parent}.{FUSED[leaf]}" if tie and leaf in FUSED else name
        groups.setdefault(key, []).append(name)
    return [Unit(key, tuple(names), tuple(shapes[n] for n in names)) for key, names in groups.items()]


@dataclass
class PlanResult:
    choice: dict[str, str]  # unit → format name
    bits: int
    numel: int
    cost: float
    budget_bits: int | None
    grid_slack_bpw: float

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


def _tables(units: list[Unit], costs: dict[str, dict[str, float]], formats: dict[str, QuantFormat], scale_bits: int):
    options = []
    for unit in units:
        row = costs.get(unit.name)
        if row is None:
            raise InferkitError(f"the scan has no entry for {unit.name}; was it made with other ignore rules or another model?")
        opts = [(name, unit.bits(formats[name], scale_bits), float(row[name])) for name in formats if name in row and unit.fits(formats[name])]
        if not opts:
            raise InferkitError(f"no candidate format fits {unit.name}")
        for name, _, cost in opts:
            if not math.isfinite(cost) or cost < 0:
                raise InferkitError(f"the scan's cost of {unit.name} at {name} is {cost}; costs must be finite and non-negative")
        options.append(opts)
    return options


def bpw_range(units: list[Unit], costs, formats, scale_bits: int) -> tuple[float, float]:
    """The smallest and largest bits per weight any plan can reach."""
    options = _tables(units, costs, formats, scale_bits)
    numel = sum(u.numel for u in units)
    return (sum(min(b for _, b, _ in o) for o in options) / numel, sum(max(b for _, b, _ in o) for o in options) / numel)


def solve(units: list[Unit], costs: dict[str, dict[str, float]], formats: dict[str, QuantFormat],
          scale_bits: int, target_bpw: float | None = None, max_cost: float | None = None) -> PlanResult:
    """The plan of least summed cost within ``target_bpw``, or of fewest bits within ``max_cost``."""
    if (target_bpw is None) == (max_cost is None):
        raise InferkitError("give exactly one of a bits-per-weight target and a maximum cost")
    options = _tables(units, costs, formats, scale_bits)
    numel = sum(u.numel for u in units)
    lo_bits = sum(min(b for _, b, _ in o) for o in options)
    hi_bits = sum(max(b for _, b, _ in o) for o in options)
    if target_bpw is not None:
        lo, hi = lo_bits / numel, hi_bits / numel
        if target_bpw < lo - 1e-12:
            raise InferkitError(f"target {target_bpw} bits/weight is below the smallest plan ({lo:.4f}: every layer in its fewest-bit format)")
        if target_bpw > hi + 1e-12:
            raise InferkitError(f"target {target_bpw} bits/weight is above the largest plan ({hi:.4f}: every layer in its most-bit format)")
        budget = math.floor(target_bpw * numel)
    else:
        if max_cost < 0:
            raise InferkitError(f"maximum cost must be non-negative, got {max_cost}")
        budget = hi_bits
    # Exact when the options' sizes share a divisor that makes the grid small enough (they
    # usually do: every size is a multiple of the rows of its matrix); else round sizes up.
    quantum = _gcd_all(options)
    exact = budget // quantum <= STEPS
    if not exact:
        quantum = math.ceil(budget / STEPS)
    if target_bpw is not None:
        size = budget // quantum + 1
    else:
        size = sum(max(math.ceil(b / quantum) for _, b, _ in opts) for opts in options) + 1
    inf = float("inf")
    dp = torch.full((size,), inf, dtype=torch.float64)
    dp[0] = 0.0
    picks = []
    for opts in options:
        new = torch.full((size,), inf, dtype=torch.float64)
        pick = torch.full((size,), -1, dtype=torch.int8)
        for k, (_, bits, cost) in enumerate(opts):
            w = math.ceil(bits / quantum)
            if w >= size:
                continue
            cand = torch.full((size,), inf, dtype=torch.float64)
            cand[w:] = dp[: size - w] + cost
            better = cand < new  # strict: earlier candidates win ties
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(k, dtype=torch.int8), pick)
        dp = new
        picks.append(pick)
    finite = torch.isfinite(dp)
    if not finite.any():
        raise InferkitError("no plan fits the budget")
    if target_bpw is not None:
        best = float(dp[finite].min())
        # least cost; among equal costs the fewest bits
        end = int(torch.nonzero(finite & (dp <= best)).min())
    else:
        ok = finite & (dp <= max_cost * (1 + 1e-12))
        if not ok.any():
            floor = float(dp[finite].min())
            raise InferkitError(f"no plan reaches a cost of {max_cost}; the least possible is {floor:.6g}")
        end = int(torch.nonzero(ok).min())
    choice = {}
    pos = end
    for unit, opts, pick in zip(reversed(units), reversed(options), reversed(picks)):
        k = int(pick[pos])
        name, bits, _ = opts[k]
        choice[unit.name] = name
        pos -= math.ceil(bits / quantum)
    choice = {u.name: choice[u.name] for u in units}
    total_bits = sum(unit.bits(formats[choice[unit.name]], scale_bits) for unit in units)
    total_cost = sum(float(costs[unit.name][choice[unit.name]]) for unit in units)
    return PlanResult(choice, total_bits, numel, total_cost, budget if target_bpw is not None else None,
                      0.0 if exact else len(units) * quantum / numel)


def _gcd_all(options) -> int:
    g = 0
    for opts in options:
        for _, bits, _ in opts:
            g = math.gcd(g, bits)
    return g
