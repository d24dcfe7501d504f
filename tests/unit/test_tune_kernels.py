"""inferkit tune-kernels: the runtime's own matmul shapes, every config checked before it is
timed, and a table the runtime's lookup serves. Without a GPU the kernels run in Triton's CPU
interpreter (TRITON_INTERPRET=1), where the times are the interpreter's: these tests check what
is measured and written, not how fast anything is."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from typer.testing import CliRunner  # noqa: E402

from inferkit.cli.main import app  # noqa: E402
from inferkit.kernels import quant_matmul as qm, tune, tuned  # noqa: E402

runner = CliRunner()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tuned_run(w4_mixed_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables") / "table.json"
    report = out.with_name("report.json")
    code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", out, "--grid", "smoke", "--rows", "1,3,16", "--json", report)
    assert code == 0, output
    return out, json.loads(report.read_text()), output


def test_tunes_the_shapes_the_runtime_launches(tuned_run):
    """q/k/v fused (64 + 2 x 32 outputs), o, gate/up fused (2 x 96), down in INT8 per channel
    (group = K in the table), each at every row count asked for, in layer order."""
    _, report, output = tuned_run
    shapes = [(r["bits"], r["group"], r["N"], r["K"], r["M"]) for r in report["results"]]
    assert shapes == [(4, 32, 128, 64, m) for m in (1, 3, 16)] + [(4, 32, 64, 64, m) for m in (1, 3, 16)] + \
        [(4, 32, 192, 64, m) for m in (1, 3, 16)] + [(8, 96, 64, 96, m) for m in (1, 3, 16)]
    assert report["results"][0]["layers"] == ["layers.0.qkv", "layers.1.qkv"]
    assert report["results"][-1]["layers"] == ["layers.0.down", "layers.1.down"]
    if DEVICE.type == "cpu":
        assert report["interpreted"] and report["device"] == "cpu (Triton interpreter)"
        assert "interpreted on the CPU" in output
    else:
        assert not report["interpreted"] and report["device"] == torch.cuda.get_device_name()
    assert "INFERKIT_KERNEL_CONFIGS=" in output


def test_every_config_is_checked_then_timed_and_the_fastest_kept(tuned_run):
    _, report, _ = tuned_run
    for r in report["results"]:
        configs = r["configs"]
        heuristic = qm.pick_config(r["M"], r["N"], r["K"], r["group"], DEVICE, r["bits"])
        assert {k: configs[0][k] for k in heuristic} == heuristic  # the heuristic's first
        kernels = {c.get("KERNEL", "gemv" if r["M"] <= 4 else "mma") for c in configs}
        # the smoke grid: one tiny config each; the swap kernel for INT4 only
        assert kernels == ({"gemv", "mma"} if r["M"] <= 4 else {"mma"}) | ({"swap"} if r["bits"] == 4 else set())
        for c in configs:
            assert c["error"] is None, c
            assert c["rel_err"] < tune.MAX_REL_ERR[torch.bfloat16] and c["us"] > 0
        fastest = min(configs, key=lambda c: c["us"])
        assert r["best"]["us"] == round(fastest["us"], 2) and r["best"]["heuristic_us"] == round(configs[0]["us"], 2)
        assert all(r["best"][k] == fastest[k] for k in ("BN", "BK", "SPLIT_K", "num_warps"))


def test_the_runtime_lookup_serves_the_written_table(tuned_run, monkeypatch):
    """The table's keys are the ones the matmul looks up: with it named by INFERKIT_KERNEL_CONFIGS
    and this device reported under the table's name, every launch shape gets its entry."""
    out, report, _ = tuned_run
    device, entries = tuned.read_table(out)
    assert device == report["device"] and len(entries) == 12
    monkeypatch.setenv(tuned.ENV, str(out))
    monkeypatch.setattr(qm, "_device_name", lambda dev: device)
    qm.reset_configs()
    try:
        for e in entries:
            got = dict(qm._picked(e["M"], e["N"], e["K"], e["group"], DEVICE, e["bits"]))
            assert got == {k: e[k] for k in ("BN", "BK", "SPLIT_K", "num_warps", "VEC_X", "ONE_DOT", "KERNEL") if k in e}
    finally:
        monkeypatch.undo()
        qm.reset_configs()


def test_existing_table_needs_overwrite_or_update(tuned_run, w4_mixed_artifact):
    out, _, _ = tuned_run
    before = out.read_text()
    code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", out, "--grid", "smoke", "--rows", "2")
    assert code == 1 and "exists: pass --overwrite to replace it or --update to add to it" in output
    assert out.read_text() == before
    copy = out.with_name("copy.json")
    copy.write_text(before)
    code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", copy, "--grid", "smoke", "--rows", "2,3", "--update")
    assert code == 0, output
    _, entries = tuned.read_table(copy)
    assert sorted({e["M"] for e in entries}) == [1, 2, 3, 16] and len(entries) == 16  # 3 re-measured, 2 added
    other = out.with_name("other.json")
    tuned.write_table(other, "Some Other GPU 80GB", entries[:1])  # not this machine's, whatever it has
    code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", other, "--grid", "smoke", "--rows", "1", "--update")
    assert code == 1 and "is a table for 'Some Other GPU 80GB', not this GPU" in output


def test_pdl_times_the_fastest_configs_again_as_pdl_launches(w4_mixed_artifact, tmp_path):
    """--pdl: after each shape's grid, its 3 fastest configs again as programmatic dependent
    launches (checked against the reference first, like every config); the fastest of all is
    kept, with the fastest plain launch's time beside it when a PDL launch wins. The interpreter
    runs the PDL loops without the waits (its times say nothing about which is faster)."""
    out, report = tmp_path / "t.json", tmp_path / "r.json"
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", out, "--grid", "smoke", "--rows", "1", "--pdl")
        assert code == 1 and "--pdl: programmatic dependent launches need an sm_90 or later NVIDIA GPU" in output
        return
    code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", out, "--grid", "smoke", "--rows", "1,16", "--pdl",
                          "--json", report)
    assert code == 0, output
    result = json.loads(report.read_text())
    assert result["pdl"] is True and len(result["results"]) == 8
    for r in result["results"]:
        plain = [c for c in r["configs"] if not c.get("PDL")]
        assert len(plain) == len(tune.candidates(r["M"], r["N"], r["K"], r["group"], r["bits"], DEVICE, "smoke"))
        fastest = sorted(plain, key=lambda c: c["us"])[:tune.PDL_TOP]
        again = r["configs"][len(plain):]
        assert [{**{k: v for k, v in c.items() if k not in ("us", "rel_err", "error")}, "PDL": True} for c in fastest] \
            == [{k: v for k, v in c.items() if k not in ("us", "rel_err", "error")} for c in again]
        assert all(c["error"] is None and c["us"] > 0 for c in again)
        best = r["best"]
        assert best["us"] == round(min(c["us"] for c in r["configs"]), 2)
        assert best.get("plain_us") == (round(min(c["us"] for c in plain), 2) if best.get("PDL") else None)
    _, entries = tuned.read_table(out)
    assert [e.get("PDL", False) for e in entries] == [bool(r["best"].get("PDL")) for r in result["results"]]
    assert "--grid smoke --pdl" in json.loads(out.read_text())["source"]


@pytest.mark.parametrize("args, why", [
    (["--rows", "0,65"], "--rows must be 1-64"),
    (["--rows", "one"], "--rows takes row counts separated by commas"),
    (["--grid", "huge"], "--grid must be one of full, quick, smoke"),
    (["--dtype", "int8"], "--dtype must be one of bfloat16, float16, float32"),
    (["--overwrite", "--update"], "give --overwrite or --update, not both"),
])
def test_bad_options_are_one_line_errors(w4_mixed_artifact, tmp_path, args, why):
    code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", tmp_path / "t.json", *args)
    assert code == 1 and why in output and "Traceback" not in output
    assert not (tmp_path / "t.json").exists()


def test_unquantized_model_and_no_gpu_are_refused(tiny_llama, w4_mixed_artifact, tmp_path, monkeypatch):
    code, output = invoke("tune-kernels", tiny_llama, "-o", tmp_path / "t.json", "--grid", "smoke", "--rows", "1")
    assert code == 1 and "no INT4/INT8 layers the Triton matmul serves" in output
    if DEVICE.type == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        code, output = invoke("tune-kernels", w4_mixed_artifact, "-o", tmp_path / "t.json")
        assert code == 1 and "times the Triton kernels on a CUDA GPU and none is visible" in output
    assert not (tmp_path / "t.json").exists()


def test_wrong_and_failing_configs_are_reported_not_timed(w4_mixed_artifact):
    """A config that cannot launch (a tile that is not a power of two) and outputs that disagree
    with the reference come back with the reason and no time; no entry is made from them."""
    from inferkit.runtime import LLM

    llm = LLM(w4_mixed_artifact, device=str(DEVICE), dtype="bfloat16", linear_backend="triton", attention_backend="torch",
              cuda_graphs=False, max_model_len=16, num_kv_blocks=1)
    problem = tune.model_problems(llm.engine.model)[0]
    good = tune.candidates(1, problem.N, problem.K, problem.group, problem.bits, DEVICE, "smoke")[0]
    rows = tune.sweep(problem, 1, torch.bfloat16, [{**good, "BN": 24}, good])
    assert rows[0]["us"] is None and rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["us"] > 0
    assert tune.best_entry(problem, 1, rows)["BN"] == good["BN"]
    wrong = tune.sweep(problem, 1, torch.bfloat16, [good], weight=problem.dequantized() * 1.1)
    assert wrong[0]["us"] is None and wrong[0]["error"].startswith("wrong output: relative error")
    assert tune.best_entry(problem, 1, wrong) is None


def test_candidate_grids():
    dev = torch.device("cpu")
    full = tune.candidates(1, 14336, 4096, 128, 4, dev, "full")
    quick = tune.candidates(1, 14336, 4096, 128, 4, dev, "quick")
    assert full[0] == quick[0] == {**qm.pick_config(1, 14336, 4096, 128, dev, 4), "VEC_X": True}
    assert len({tuple(sorted(c.items())) for c in full}) == len(full)  # no repeats
    # 6 tiles x 4 splits (the heuristic's among them), 2 of them also 2 tiles ahead and in 4
    # pipelined stages at 2 splits; the swap kernel's 128x4 at 3 splits and 256x8 at 2
    assert len(quick) == 38 and len(full) > len(quick)
    assert sorted((c["BN"], c["num_warps"], c["SPLIT_K"]) for c in quick if c.get("KERNEL") == "swap") == \
        [(128, 4, 1), (128, 4, 4), (128, 4, 8), (256, 8, 4), (256, 8, 8)]
    assert len([c for c in full if c.get("KERNEL") == "swap"]) == 4 * 2 * 5  # tiles x (joined, per value) x splits
    # groups of 64: a K tile of 64, 8 deep per value position, under the tensor cores' 16: joined only
    g64 = [c for c in tune.candidates(1, 14336, 4096, 64, 4, dev, "full") if c.get("KERNEL") == "swap"]
    assert len(g64) == 4 * 5 and all(c["ONE_DOT"] and c["BK"] == 64 for c in g64)
    for keys in ({"PREFETCH": 2}, {"STAGES": 4}):
        assert sorted((c["BN"], c["num_warps"], c["SPLIT_K"]) for c in quick if keys.items() <= c.items()) == \
            [(64, 4, 4), (64, 4, 8), (128, 8, 4), (128, 8, 8)]
    assert {c.get("PREFETCH", 1) for c in full} == {1, 2, 3} and {c.get("STAGES", 0) for c in full} == {0, 3, 4}
    assert quick[1] == {**quick[0], "REG_CAP": 0} and full[1] == quick[1]  # and it uncapped
    assert {c["SPLIT_K"] for c in full} == {1, 2, 4, 8, 16}
    for c in full:  # every GEMV tile gives each thread 1-16 packed words
        assert c.get("KERNEL") == "swap" or 1 <= c["BN"] * c["BK"] // 8 // (32 * c["num_warps"]) <= 16
    mma = tune.candidates(32, 4096, 4096, 128, 4, dev, "full")
    assert all(c.get("ONE_DOT") in (True, False) and "VEC_X" not in c for c in mma)
    assert {c.get("STAGES", 2) for c in mma} == {2, 3, 4}  # the MMA kernel's pipeline depth
    assert {c.get("STAGES", 2) for c in tune.candidates(16, 4096, 4096, 128, 4, dev, "quick")} == {2, 4}
    small_k = tune.candidates(1, 64, 64, 32, 4, dev, "full")
    assert all(c["SPLIT_K"] * c["BK"] <= 64 or c["SPLIT_K"] == 1 for c in small_k)  # each split gets inputs
    with pytest.raises(ValueError, match="grid must be one of"):
        tune.candidates(1, 64, 64, 32, 4, dev, "everything")


def test_table_labels_for_times_and_configs():
    from inferkit.cli.tune_kernels import describe, duration

    assert [duration(v) for v in (None, 21.93, 99.94, 99.96, 999.4, 999.6, 1500.0, 524822.9, 1217572.3)] == [
        "", "21.9 µs", "99.9 µs", "100 µs", "999 µs", "1.0 ms", "1.5 ms", "525 ms", "1.2 s"]
    assert describe({"M": 1, "BN": 128, "BK": 128, "SPLIT_K": 8, "num_warps": 4, "VEC_X": True}) == "gemv 128x128 k8 w4"
    assert describe({"M": 1, "BN": 64, "BK": 128, "SPLIT_K": 1, "num_warps": 2, "VEC_X": False}) == "gemv 64x128 k1 w2 strided-x"
    assert describe({"M": 16, "BN": 64, "BK": 128, "SPLIT_K": 4, "num_warps": 4, "ONE_DOT": False}) == "mma 64x128 k4 w4 dot/value"
    assert describe({"M": 1, "BN": 128, "BK": 128, "SPLIT_K": 8, "num_warps": 8, "REG_CAP": 0}) == "gemv 128x128 k8 w8 regs-uncapped"
    assert describe({"M": 1, "BN": 64, "BK": 128, "SPLIT_K": 8, "num_warps": 4, "PREFETCH": 2}) == "gemv 64x128 k8 w4 pf2"
    assert describe({"M": 1, "BN": 64, "BK": 128, "SPLIT_K": 8, "num_warps": 4, "STAGES": 3}) == "gemv 64x128 k8 w4 st3"
    assert describe({"M": 2, "KERNEL": "mma", "BN": 64, "BK": 128, "SPLIT_K": 1, "num_warps": 4}) == "mma 64x128 k1 w4"
    assert describe({"M": 1, "KERNEL": "swap", "BN": 128, "BK": 128, "SPLIT_K": 4, "num_warps": 4}) == "swap 128x128 k4 w4"
    assert describe({"M": 1, "BN": 64, "BK": 128, "SPLIT_K": 8, "num_warps": 4, "PREFETCH": 2, "PDL": True}) == \
        "gemv 64x128 k8 w4 pf2 pdl"
    assert describe({"M": 8, "KERNEL": "swap", "BN": 128, "BK": 128, "SPLIT_K": 4, "num_warps": 4, "ONE_DOT": False,
                     "STAGES": 2}) == "swap 128x128 k4 w4 dot/value st2"
