"""PNG heatmap of a sensitivity scan: unit kind × format down, layer across, log10 cost as colour,
with a line of each layer's total cost at the fewest-bit format under it."""

from __future__ import annotations

import math
from pathlib import Path


def _kind(unit_name: str) -> str:
    return unit_name.split(".", 3)[3]  # model.layers.N.<kind>


def heatmap_matrix(scan: dict) -> tuple[list[str], list[int], list[list[float]]]:
    """Row labels (kind · format), layer indices, and log10 cost (nan where a format does not fit)."""
    layers = sorted({u["layer"] for u in scan["units"]})
    kinds: list[str] = []
    for u in scan["units"]:
        if _kind(u["name"]) not in kinds:
            kinds.append(_kind(u["name"]))
    labels = [f"{k} · {f}" for k in kinds for f in scan["formats"]]
    index = {layer: j for j, layer in enumerate(layers)}
    grid = [[math.nan] * len(layers) for _ in labels]
    for u in scan["units"]:
        for f, cost in scan["costs"][u["name"]].items():
            row = labels.index(f"{_kind(u['name'])} · {f}")
            grid[row][index[u["layer"]]] = math.log10(max(cost, 1e-30))
    keep = [i for i, row in enumerate(grid) if any(not math.isnan(v) for v in row)]  # formats that fit
    return [labels[i] for i in keep], layers, [grid[i] for i in keep]


def layer_totals(scan: dict) -> tuple[list[int], list[float]]:
    """Per layer, the summed cost of its units each at the fewest-bit format it can take."""
    layers = sorted({u["layer"] for u in scan["units"]})
    totals = []
    for layer in layers:
        total = 0.0
        for u in scan["units"]:
            if u["layer"] == layer:
                row = scan["costs"][u["name"]]
                total += row[min(row, key=_bits_key)]
        totals.append(total)
    return layers, totals


def write_heatmap(scan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, layers, grid = heatmap_matrix(scan)
    data = np.array(grid, dtype=float)
    fig, (ax, line) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(layers) + 4), 0.3 * len(labels) + 4),
                                   gridspec_kw={"height_ratios": [len(labels), 6]}, sharex=True)
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"{scan['mode']} sensitivity ({scan['method']}): log10 cost, {scan['model']['path']}", fontsize=9)
    fig.colorbar(image, ax=[ax, line], shrink=0.6, label="log10 cost")
    _, totals = layer_totals(scan)
    line.plot(range(len(layers)), totals, marker="o", markersize=3)
    line.set_yscale("log")
    line.set_ylabel("layer cost at the\nfewest-bit formats", fontsize=8)
    line.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    line.set_xlabel("decoder layer")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _bits_key(name: str) -> tuple[int, int]:
    from inferkit.quant.scheme import parse_format

    fmt = parse_format(name)
    return fmt.bits, -(fmt.group_size or 10**9)
