"""Mixed precision against uniform formats: perplexity versus bits per weight on the demo model.

Calibrates once on WikiText-2 valid (128 x 512 tokens) and quantizes every point with GPTQ from
those statistics (activation order, clipping search, 16-bit scales), so uniform and mixed points
differ only in the per-layer formats. Then:

- uniform points: INT3 g64/g32, INT4 g64/g32 (asymmetric and symmetric), INT8 per channel;
- the three sensitivity scans (block, kl, proxy) with their times, and how well the block and
  proxy rankings agree with KL (Spearman, over every unit and format);
- mixed plans from the block scan at 4.25, 4.5, 5.0 and 6.0 bits per weight, and from the kl
  and proxy scans at 4.5;
- perplexity on WikiText-2 test (40 x 512) for each, and on the built-in calibration set's
  held-out text for the 4.5 bpw plan and the uniform points around it;
- checks: each mixed point strictly below the line joining the uniform frontier points around
  it, 4.5 bpw mixed better than uniform W4-g32, and the +12% / +6% / +3% targets.

Writes benchmarks/results/pareto.json and pareto.png.

    python benchmarks/pareto.py            # about 45 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
MIXED_FORMATS = ("int8-ch-asym", "int4-g32-asym", "int4-g64-asym", "int4-g128-asym", "int3-g32-asym", "int3-g64-asym")
UNIFORM = ("int3-g64-asym", "int3-g32-asym", "int4-g64-sym", "int4-g64-asym", "int4-g32-sym", "int4-g32-asym", "int8-ch-sym")
TARGETS = (4.25, 4.5, 5.0, 6.0)
LIMITS = {4.5: 12.0, 5.0: 6.0, 6.0: 3.0}  # % over fp32 at or under this many bits per weight


def spearman(a: list[float], b: list[float]) -> float:
    import torch

    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        r = torch.empty_like(t)
        r[t.argsort()] = torch.arange(len(x), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def paired(scan_a: dict, scan_b: dict) -> tuple[list[float], list[float]]:
    a, b = [], []
    for unit, row in scan_a["costs"].items():
        for fmt, cost in row.items():
            a.append(cost)
            b.append(scan_b["costs"][unit][fmt])
    return a, b


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (bits, perplexity): the best any mix of uniform points could do."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def line_at(hull: list[tuple[float, float]], x: float) -> float | None:
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if x1 <= x <= x2:
            return y1 + (y2 - y1) * (x - x1) / (x2 - x1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calibration", default=str(WIKITEXT / "valid.txt"))
    parser.add_argument("--eval-text", default=str(WIKITEXT / "test.txt"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--num-samples", type=int, default=128, help="Calibration windows of 512 tokens.")
    parser.add_argument("--scans", default="block,kl,proxy")
    parser.add_argument("--reuse-scans", default=None, help="Folder holding scan-MODE/ folders (scan.json, timings.json) from an "
                        "earlier run with the same model and calibration: those modes are loaded, with their measured times, "
                        "instead of scanned again.")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pareto.json"))
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from inferkit.cli.sensitivity import plan_table, sensitivity_table
    from inferkit.cli.ui import table
    from inferkit.config import QuantizeConfig, Recipe, ScanConfig
    from inferkit.data.calibration import CalibrationConfig, load_documents, render
    from inferkit.eval import EvalWindows, evaluate, text_windows
    from inferkit.models import load_model
    from inferkit.models.demo import resolve_model_arg
    from inferkit.quant.scheme import parse_format
    from inferkit.stages.calibrate import run_calibrate
    from inferkit.stages.plan import load_scan, make_plan
    from inferkit.stages.quantize import run_quantize
    from inferkit.stages.sensitivity import run_scan

    console = Console(width=200)
    model = resolve_model_arg(args.model, log=console.print)
    fp = load_model(model)
    wiki = text_windows(fp.tokenizer, Path(args.eval_text).read_text(encoding="utf-8"), EvalWindows(512, args.windows))
    body = "\n\n".join(render(d, fp.tokenizer, True) for d in load_documents(CalibrationConfig(source="builtin", split="heldout")))
    n_ids = len(fp.tokenizer(body, add_special_tokens=False)["input_ids"])
    builtin = text_windows(fp.tokenizer, body, EvalWindows(512, min(16, n_ids // 512)))
    fp_ppl = {"wikitext": evaluate(fp.model, wiki)["perplexity"], "builtin": evaluate(fp.model, builtin)["perplexity"]}
    console.print(f"fp32 perplexity: WikiText-2 {fp_ppl['wikitext']:.3f}, built-in held-out {fp_ppl['builtin']:.3f} ({builtin.shape[0]} x 512)")
    del fp

    calib = CalibrationConfig(source=args.calibration, num_samples=args.num_samples, seq_len=512)
    base_q = QuantizeConfig(method="gptq", symmetric=False, actorder=True, scale_search=True, scale_dtype="float16")
    recipe = Recipe(quantize=base_q, calibration=calib)
    work = Path(tempfile.mkdtemp(prefix="inferkit-pareto-"))
    report: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                    "model": model, "fp32": fp_ppl, "calibration": str(args.calibration), "scale_dtype": "float16",
                    "eval": {"wikitext_windows": args.windows, "builtin_windows": int(builtin.shape[0])}}
    try:
        t = time.perf_counter()
        run_calibrate(model, calib, work / "stats")
        report["calibrate_s"] = round(time.perf_counter() - t, 1)
        console.print(f"calibrated in {report['calibrate_s']} s")

        def point(name: str, rec: Recipe, plan: dict | None = None, second: bool = False) -> dict:
            out = work / name
            result = run_quantize(model, rec, out, stats_dir=work / "stats", plan=plan)
            m = load_model(out, tokenizer=False).model
            row = {"name": name, "bits_per_weight": result.bits_per_weight,
                   "perplexity": evaluate(m, wiki)["perplexity"], "quantize_s": result.seconds["total"]}
            if second:
                row["perplexity_builtin"] = evaluate(m, builtin)["perplexity"]
            row["delta_pct"] = 100 * (row["perplexity"] / fp_ppl["wikitext"] - 1)
            console.print(f"  {name}: {row['bits_per_weight']:.4f} bpw, perplexity {row['perplexity']:.3f} ({row['delta_pct']:+.2f}%)")
            shutil.rmtree(out, ignore_errors=True)
            return row

        uniform = []
        for name in UNIFORM:
            fmt = parse_format(name)
            rec = replace(recipe, quantize=replace(base_q, bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric))
            uniform.append(point(name, rec, second=name in ("int4-g64-asym", "int4-g32-asym", "int4-g32-sym", "int4-g64-sym")))
        report["uniform"] = uniform

        scans, scan_rows = {}, []
        for mode in args.scans.split(","):
            scan_cfg = ScanConfig(mode=mode, formats=MIXED_FORMATS)
            rec = replace(recipe, sensitivity=scan_cfg)
            reused = Path(args.reuse_scans) / f"scan-{mode}" if args.reuse_scans else None
            if reused is not None and (reused / "scan.json").is_file():
                shutil.copytree(reused, work / f"scan-{mode}")
                result, _ = load_scan(work / f"scan-{mode}")
                seconds = json.loads((reused / "timings.json").read_text())["timings_s"]["total"]
                console.print(f"{mode} scan reused from {reused}")
            else:
                t = time.perf_counter()
                result = run_scan(model, rec, scan_cfg, work / f"scan-{mode}", stats_dir=work / "stats")
                seconds = round(time.perf_counter() - t, 1)
            keep = Path(args.json).parent / "scans" / f"scan-{mode}"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work / f"scan-{mode}", keep)
            scans[mode] = result
            scan_rows.append({"mode": mode, "seconds": seconds, "reused": reused is not None and (reused / "scan.json").is_file()})
            console.print(f"{mode} scan: {seconds} s")
            if mode == "block":
                console.print(sensitivity_table(result, 10))
                out_dir = Path(args.json).parent
                out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(work / "scan-block" / "heatmap.png", out_dir / "sensitivity-block.png")
        for row in scan_rows:
            if row["mode"] != "kl" and "kl" in scans:
                row["spearman_vs_kl"] = spearman(*paired(scans[row["mode"]], scans["kl"]))
        report["scans"] = scan_rows

        mixed = []
        for mode in scans:
            targets = TARGETS if mode == "block" else (4.5,)
            for target in targets:
                data, file = load_scan(work / f"scan-{mode}")
                plan = make_plan(data, file, target_bpw=target)
                console.print(plan_table(plan))
                row = point(f"mixed-{mode}-{target}", recipe, plan=plan, second=(mode == "block" and target == 4.5))
                row.update(target=target, scan=mode, predicted_cost=plan["predicted_cost"], format_counts=plan["format_counts"])
                mixed.append(row)
        report["mixed"] = mixed
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hull = frontier([(r["bits_per_weight"], r["perplexity"]) for r in uniform])
    checks = []

    def check(target, measured, ok):
        checks.append({"target": target, "measured": measured, "pass": bool(ok)})

    for r in mixed:
        if r["scan"] != "block":
            continue
        y = line_at(hull, r["bits_per_weight"])
        check(f"mixed {r['target']} bpw below the uniform frontier", f"{r['perplexity']:.3f} vs line {y:.3f}" if y else "outside the uniform range",
              y is not None and r["perplexity"] < y)
        for limit_bpw, pct in LIMITS.items():
            if r["target"] == limit_bpw:
                check(f"mixed ≤ {limit_bpw} bpw within +{pct}% of fp32", f"{r['delta_pct']:+.2f}% at {r['bits_per_weight']:.4f} bpw",
                      r["delta_pct"] <= pct and r["bits_per_weight"] <= limit_bpw)
    m45 = next((r for r in mixed if r["scan"] == "block" and r["target"] == 4.5), None)
    for name in ("int4-g32-sym", "int4-g32-asym"):
        u = next(r for r in uniform if r["name"] == name)
        if m45:
            check(f"mixed 4.5 better than uniform {name} GPTQ ({u['bits_per_weight']:.3f} bpw), WikiText-2",
                  f"{m45['perplexity']:.3f} vs {u['perplexity']:.3f}", m45["perplexity"] < u["perplexity"])
            check(f"mixed 4.5 better than uniform {name}, built-in held-out text",
                  f"{m45['perplexity_builtin']:.3f} vs {u['perplexity_builtin']:.3f}", m45["perplexity_builtin"] < u["perplexity_builtin"])
    limits = {"block": 600, "kl": 1800, "proxy": 120}
    for row in report["scans"]:
        check(f"{row['mode']} scan ≤ {limits[row['mode']]} s", f"{row['seconds']} s", row["seconds"] <= limits[row["mode"]])
    report["frontier"] = hull
    report["checks"] = checks

    rows = [[r["name"], r["bits_per_weight"], r["perplexity"], r["delta_pct"], r.get("perplexity_builtin")] for r in uniform + mixed]
    console.print(table(f"WikiText-2 test {args.windows}x512 (fp32 {fp_ppl['wikitext']:.3f}); built-in held-out (fp32 {fp_ppl['builtin']:.3f})",
                        ["point", "bits/w", "perplexity", "Δ %", "built-in ppl"], rows))
    console.print(table("scans", ["mode", "seconds", "Spearman vs kl"], [[r["mode"], r["seconds"], r.get("spearman_vs_kl")] for r in report["scans"]]))
    console.print(table("targets (issue 3)", ["target", "measured", "pass"], [[c["target"], c["measured"], "yes" if c["pass"] else "NO"] for c in checks]))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    console.print(f"results written to {out} and {out.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    uni = report["uniform"]
    ax.scatter([r["bits_per_weight"] for r in uni], [r["perplexity"] for r in uni], color="tab:gray", label="uniform")
    for r in uni:
        ax.annotate(r["name"], (r["bits_per_weight"], r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    hull = report["frontier"]
    ax.plot([p[0] for p in hull], [p[1] for p in hull], color="tab:gray", linestyle="--", linewidth=1, label="uniform frontier")
    for mode, color in (("block", "tab:red"), ("kl", "tab:blue"), ("proxy", "tab:green")):
        pts = [r for r in report["mixed"] if r["scan"] == mode]
        if pts:
            ax.plot([r["bits_per_weight"] for r in pts], [r["perplexity"] for r in pts], marker="o", color=color,
                    label=f"mixed ({mode} scan)", linestyle="-" if len(pts) > 1 else "none")
    ax.axhline(report["fp32"]["wikitext"], color="black", linewidth=0.8, label="fp32")
    ax.set_xlabel("bits per weight (scales and zero points included)")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title("SmolLM2-135M: GPTQ, uniform vs mixed precision")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
