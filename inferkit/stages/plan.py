"""Plans: one format per linear, chosen from a sensitivity scan under a bit budget.

Bits are counted over the quantized linear weights of the decoder layers (packed values,
scales in the model's dtype and zero points), exactly as ``quantize`` reports them.
Embeddings, norms and an ignored lm_head stay in full precision and are not counted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from inferkit import __version__
from inferkit.errors import InferkitError
from inferkit.quant.planner import Unit, solve
from inferkit.quant.scheme import QuantFormat, parse_format
from inferkit.stages.sensitivity import SCAN_FILE

BITS_COUNTED = ("quantized linear weights of the decoder layers, with scales and zero points; "
                "embeddings, norms and an ignored lm_head stay full precision and are not counted")


def _read_json(file: Path, kind: str, what: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InferkitError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise InferkitError(f"{file} is not an inferkit {what}")
    return data


def load_scan(path: str | Path) -> tuple[dict, Path]:
    """A scan from its folder or its scan.json; returns it and the file it came from."""
    p = Path(path)
    file = p / SCAN_FILE if p.is_dir() else p
    if not file.is_file():
        raise InferkitError(f"no sensitivity scan at {p}; run inferkit sensitivity-scan first")
    return _read_json(file, "inferkit-sensitivity-scan", "sensitivity scan"), file


def _units(scan: dict) -> list[Unit]:
    return [Unit(u["name"], tuple(u["members"]), tuple(tuple(s) for s in u["shapes"])) for u in scan["units"]]


def make_plan(scan: dict, scan_file: Path | None = None, target_bpw: float | None = None,
              max_cost: float | None = None) -> dict:
    """The plan JSON: per-layer formats, achieved bits per weight, predicted cost, and for
    comparison what each uniform format would cost."""
    formats = {name: parse_format(name) for name in scan["formats"]}
    units = _units(scan)
    result = solve(units, scan["costs"], formats, scan["scale_bits"], target_bpw=target_bpw, max_cost=max_cost)
    layers = {}
    for unit in units:
        for member in unit.members:
            layers[member] = result.choice[unit.name]
    counts: dict[str, int] = {}
    for fmt in result.choice.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    uniform = {}
    for name, fmt in formats.items():
        if all(u.fits(fmt) for u in units):
            bits = sum(u.bits(fmt, scan["scale_bits"]) for u in units)
            uniform[name] = {"bits_per_weight": round(bits / result.numel, 6),
                             "predicted_cost": sum(scan["costs"][u.name][name] for u in units)}
    return {
        "kind": "inferkit-plan",
        "inferkit_version": __version__,
        "model": scan["model"],
        "scan": {"file": str(scan_file) if scan_file else None, "mode": scan["mode"], "method": scan["method"],
                 "sha256": hashlib.sha256(json.dumps(scan, sort_keys=True).encode()).hexdigest()},
        "target": {"bits_per_weight": target_bpw} if target_bpw is not None else {"max_cost": max_cost},
        "bits_counted": BITS_COUNTED,
        "bits_per_weight": round(result.bpw, 6),
        "predicted_cost": result.cost,
        "cost": scan["cost"],
        "grid_slack_bpw": result.grid_slack_bpw,
        "units": result.choice,
        "format_counts": counts,
        "uniform": uniform,
        "layers": layers,
    }


def load_plan(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InferkitError(f"plan {p} does not exist")
    plan = _read_json(p, "inferkit-plan", "plan")
    if not isinstance(plan.get("layers"), dict):
        raise InferkitError(f"{p} is not an inferkit plan: it has no layers")
    return plan


def plan_layer_formats(plan: dict, linears: dict[str, tuple[int, int]], ignored: set[str],
                       fingerprint: str | None) -> dict[str, QuantFormat | None]:
    """Check a plan against the model and give every linear its format (None: full precision)."""
    if fingerprint is not None and plan["model"].get("fingerprint") not in (None, fingerprint):
        raise InferkitError(f"the plan and its scan were made for another model ({plan['model'].get('path')}): "
                            "their fingerprint does not match this model's files")
    unknown = sorted(set(plan["layers"]) - set(linears))
    if unknown:
        raise InferkitError(f"the plan names {unknown[0]}, which is not a linear layer of this model")
    formats: dict[str, QuantFormat | None] = {}
    for name, (_, in_features) in linears.items():
        if name in plan["layers"]:
            fmt = parse_format(plan["layers"][name])
            fmt.check_divides(name, in_features)
            formats[name] = fmt
        elif name in ignored:
            formats[name] = None
        else:
            raise InferkitError(f"the plan gives no format for {name}; make the plan from a scan with the same ignore rules")
    return formats
