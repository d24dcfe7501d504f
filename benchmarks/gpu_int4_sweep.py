"""The full tile grid (``inferkit tune-kernels --grid full``) for the INT4 decode GEMV at batch 1,
each capped config also without the register cap, beside bf16 ``torch.matmul`` timed the same
way (graph-replayed, operands cycled past L2). For the issue's 2.5x target at 4096x14336, where
the quick grid of ``benchmarks/gpu_kernels.py`` stops at 2.38x. ``--grid prefetch``: the GEMV's
tiles pipelined (``STAGES``) or loading 1-3 tiles ahead (``PREFETCH``), the bytes-in-flight
experiment (134 timings at 4096x14336: ``GPU_SWEEP_S=280``). ``--grid swap``: the swap kernel
(``KERNEL: swap``, INT4 on the tensor cores with the weights as the first operand, 2.5-2.8
instructions per weight on sm_90 against the GEMV's 4.55), after the heuristic's GEMV config.
``--grid next`` (56 configs, ``GPU_SWEEP_S=200``): the most promising of the swap and prefetch
grids, each config timed plain and as a programmatic dependent launch (``PDL``), whose first
tiles' words load while the call before it finishes; the log's last line compares the fastest
of each.

    python benchmarks/gpu_int4_sweep.py --out bench_out/int4_sweep.json [--budget-s 200] \
        [--grid prefetch --shapes 4096x14336,14336x4096]

(``GPU_PARTS=sweep benchmarks/gpu.sh`` runs this; ``GPU_SWEEP_ARGS`` adds options.) Configs are
tried in the grid's order until the time budget is spent; each row prints as it is timed, and
the JSON holds every row, the fastest correct config as a tuned-table entry, and its speedup
over bf16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def prefetch_grid(N: int, K: int, device: torch.device) -> list[dict]:
    """The heuristic's config, then the GEMV's tiles of 2 and 4 rows per thread (BN x warps
    128x8, 64x4, 256x8, 128x4, 64x2) over 2-16 splits of K: pipelined in 3 and 4 stages
    (``STAGES``), loading 2 or 3 tiles ahead into registers (``PREFETCH``); then 3 ahead in 80
    registers (no spills on sm_90: 3 programs of 8 warps per SM with 96 bytes of words in flight
    per thread), 2 ahead in 72 (7 programs of 4 warps instead of 6), 2 and 5 stages, and last 1
    ahead as before (the new ones first, should the time budget run out)."""
    tiles = ((128, 8), (64, 4), (256, 8), (128, 4), (64, 2))
    loops = [({"STAGES": st}, tiles) for st in (3, 4)] + [({"PREFETCH": pf}, tiles) for pf in (2, 3)]
    loops += [({"PREFETCH": 3, "REG_CAP": 80}, ((128, 8), (64, 4))), ({"PREFETCH": 2, "REG_CAP": 72}, ((64, 4),)),
              ({"STAGES": 2}, ((128, 8), (64, 4))), ({"STAGES": 5}, ((128, 8), (64, 4))), ({"PREFETCH": 1}, tiles)]
    return _grid(N, K, device, [({"VEC_X": True, **keys}, shapes, (2, 4, 8, 16)) for keys, shapes in loops])


def _grid(N: int, K: int, device: torch.device, loops: list[tuple]) -> list[dict]:
    """The heuristic's config, then for each (keys, (BN, warps) tiles, splits) of ``loops`` the
    tiles of 128 inputs over the splits that give every split a tile, with the keys."""
    from inferkit.kernels import tune
    from inferkit.kernels.quant_matmul import pick_config

    out = [pick_config(1, N, K, 128, device, 4)]
    for keys, tiles, splits in loops:
        for bn, warps in tiles:
            for split in splits:
                if K >= 128 * split:
                    out.append({"BN": bn, "BK": 128, "SPLIT_K": split, "num_warps": warps, **keys})
    return tune._unique(out)


def swap_grid(N: int, K: int, device: torch.device) -> list[dict]:
    """The heuristic's GEMV config, then the swap kernel (61 configs), most promising first
    should the time budget run out. Compiled for sm_90 at one row (``python -m
    inferkit.kernels.sass``; registers decide programs per SM, and with them the words in flight):
    the joined tile (``ONE_DOT``) takes 2.4-2.7 instructions per weight at BN 128-256 but
    96-255 registers, 1-3 programs per SM; a dot per value position takes 3.0-4.2 in 63-110
    registers, 2-8 programs; pipelining (``STAGES`` 3-4) keeps 2-3 tiles of words in flight per
    program. So: the joined tiles over 4 and 8 splits, the joined and per-value tiles pipelined
    in 3 stages, the per-value tiles unpipelined, then the other splits (2, 16, 1), 2 and 4
    stages."""
    joined = dict(KERNEL="swap", ONE_DOT=True)
    per_value = dict(KERNEL="swap", ONE_DOT=False)
    loops = [  # (keys, (BN, warps) tiles, splits)
        (joined, ((128, 4), (256, 4), (256, 8), (64, 4), (128, 8)), (4, 8)),
        ({**joined, "STAGES": 3}, ((128, 4), (256, 4), (64, 4)), (4, 8)),
        ({**per_value, "STAGES": 3}, ((128, 4), (128, 8), (64, 4)), (4, 8)),
        (per_value, ((128, 4), (128, 8), (64, 4), (256, 8)), (4, 8)),
        (joined, ((128, 4), (256, 4), (256, 8), (64, 4), (128, 8)), (2, 16, 1)),
        ({**joined, "STAGES": 2}, ((128, 4), (64, 4)), (4, 8)),
        ({**joined, "STAGES": 4}, ((128, 4), (64, 4)), (4, 8)),
        ({**per_value, "STAGES": 4}, ((128, 8), (64, 4)), (4, 8)),
        ({**per_value, "STAGES": 3}, ((128, 4), (128, 8)), (2, 16)),
    ]
    return _grid(N, K, device, loops)


def next_grid(N: int, K: int, device: torch.device) -> list[dict]:
    """One budget's worth of the most promising configs, each followed by the same config as a
    programmatic dependent launch (``PDL``: its first tiles' words load while the call before it
    finishes): the heuristic's and the GPU's table entry, then the swap kernel's joined tiles
    at 4 and 8 splits and the GEMV's pipelined (3-4 stages) and 2-3-ahead loops on the tiles that
    kept the most bytes in flight on the H100 (BN 128 x 8 warps, 64 x 2), alternating, so that a
    budget cut short still times each family."""
    from inferkit.kernels import tune, tuned
    from inferkit.kernels.quant_matmul import _device_name

    prefetch = prefetch_grid(N, K, device)  # the heuristic's config, then the GEMV's loops
    first = [pick for pick in (prefetch[0], tuned.lookup(1, N, K, 128, 4, _device_name(device))) if pick]
    splits = (4, 8) if K >= 128 * 4 else (1, 2)  # (a small K: the CPU's check of this script)
    swap = [c for c in swap_grid(N, K, device)[1:] if c.get("ONE_DOT") and "STAGES" not in c
            and c["SPLIT_K"] in splits]
    ahead = [c for c in prefetch[1:] if (c["BN"], c["num_warps"]) in ((128, 8), (64, 2))
             and c["SPLIT_K"] in splits and "REG_CAP" not in c
             and (c.get("STAGES") in (3, 4) or c.get("PREFETCH") in (2, 3))]
    mixed = [c for pair in zip(swap, ahead) for c in pair] + swap[len(ahead):] + ahead[len(swap):]
    return [c for cfg in tune._unique(first + mixed) for c in (cfg, {**cfg, "PDL": True})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/int4_sweep.json"))
    parser.add_argument("--shapes", default="4096x14336", help="KxN (inputs x outputs), comma-separated")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting configs after this long")
    parser.add_argument("--grid", default="full", choices=("full", "quick", "prefetch", "swap", "next"),
                        help="tune-kernels' grid, or prefetch: 5 tiles x (3-4 stages, 1-3 ahead) x 4 splits, and "
                             "more; swap: the swap kernel's tiles x splits x (joined or per value) x 1-4 stages; "
                             "next: the most promising of those, each also as a programmatic dependent launch")
    args = parser.parse_args()
    from inferkit.kernels import tune
    from inferkit.kernels.quant_matmul import gemv_register_cap
    from inferkit.quant.pack import pack_int32

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")  # CPU: a check of this script (TRITON_INTERPRET=1)
    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu (check)", "shapes": []}
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x")) if cuda else (256, 64)
        g = torch.Generator().manual_seed(0)
        q4 = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        s4 = (torch.rand(N, K // 128, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
        problem = tune.Problem(4, 128, N, K, pack_int32(q4, 4, dim=1).to(dev), s4.to(dev), None, None)
        weight = (q4.float() * s4.float().repeat_interleave(128, 1)).to(dev)
        wb = weight.to(torch.bfloat16)
        x = torch.randn(1, K, dtype=torch.bfloat16, device=dev)
        b16 = K * N * 2
        copies16 = [wb] + [wb.clone() for _ in range(tune._l2_copies(b16) - 1)] if cuda else [wb]
        t_bf16 = tune.time_call(lambda i: (lambda: torch.matmul(x, copies16[i % len(copies16)].T)), b16, dev) * 1e6
        print(f"{K}x{N} bf16 graphed {t_bf16:.2f} us", flush=True)
        if args.grid == "prefetch":
            configs = prefetch_grid(N, K, dev)[:None if cuda else 3]
        elif args.grid == "swap":
            configs = swap_grid(N, K, dev)[:None if cuda else 4]
        elif args.grid == "next":
            configs = next_grid(N, K, dev)[:None if cuda else 6]
        else:
            configs = tune.candidates(1, N, K, 128, 4, dev, args.grid if cuda else "smoke")
        # each capped config once more uncapped (configs launching uncapped anyway are not repeated)
        configs += [{**c, "REG_CAP": 0} for c in configs if args.grid != "next" and "REG_CAP" not in c
                    and c.get("KERNEL", "gemv") == "gemv"
                    and gemv_register_cap(1, 4, c["BN"], c["BK"], c["num_warps"], False, False, 128,
                                          c.get("PREFETCH", 1), c.get("STAGES", 0))]
        copies = tune.operand_copies(problem, dev)
        rows = []
        for cfg in tune._unique(configs):
            if time.perf_counter() - start > args.budget_s:
                print("time budget spent: configs left untimed", flush=True)
                break
            row = tune.sweep(problem, 1, torch.bfloat16, [cfg], copies, weight)[0]
            rows.append(row)
            us = row["us"]
            print(json.dumps(cfg), f"{us:.2f} us = {t_bf16 / us:.2f}x bf16" if us else f"error {row['error']}",
                  flush=True)
        best = tune.best_entry(problem, 1, rows)
        entry = {"K": K, "N": N, "bf16_graphed_us": t_bf16, "rows": rows, "best": best,
                 "best_speedup": t_bf16 / best["us"] if best else None, "heuristic_us": rows[0]["us"] if rows else None}
        for pdl in (False, True):  # PDL's overlap with the call before, apart from the tiles'
            timed = [r["us"] for r in rows if r["us"] and r.get("PDL", False) is pdl]
            entry["best_pdl_us" if pdl else "best_plain_us"] = min(timed) if timed else None
        if entry["best_pdl_us"]:
            print(f"{K}x{N} fastest plain launch {entry['best_plain_us']:.2f} us "
                  f"({t_bf16 / entry['best_plain_us']:.2f}x bf16), as a programmatic dependent launch "
                  f"{entry['best_pdl_us']:.2f} us ({t_bf16 / entry['best_pdl_us']:.2f}x)", flush=True)
        results["shapes"].append(entry)
        if best:
            print(f"{K}x{N} best {json.dumps(best)}: {entry['best_speedup']:.2f}x bf16 (>= 2.5x: "
                  f"{'met' if entry['best_speedup'] >= 2.5 else 'NOT met'})", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
