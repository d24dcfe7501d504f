"""Measured matmul tile tables (inferkit.kernels.tuned): format checks, lookup by GPU model,
shape and row bucket, precedence of INFERKIT_KERNEL_CONFIGS over the packaged tables."""

import json

import pytest

from inferkit.kernels import tuned

H100 = "NVIDIA H100 80GB HBM3"


def entry(**over):
    e = {"bits": 4, "group": 128, "K": 4096, "N": 14336, "M": 1, "BN": 64, "BK": 128, "SPLIT_K": 4,
         "num_warps": 4, "VEC_X": False, "us": 12.5}
    e.update(over)
    return e


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No packaged tables and no override unless a test sets them; caches cleared around each test."""
    monkeypatch.setattr(tuned, "PACKAGED", tmp_path / "packaged")
    monkeypatch.delenv(tuned.ENV, raising=False)
    tuned.clear_cache()
    yield
    tuned.clear_cache()


def test_slug_and_buckets():
    assert tuned.slug(H100) == "NVIDIA_H100_80GB_HBM3"
    assert tuned.slug("NVIDIA H200 (141GB)") == "NVIDIA_H200_141GB"
    assert [tuned.bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 32, 33, 64, 65, 300)] == \
        [1, 2, 3, 4, 16, 16, 32, 32, 64, 64, None, None]


def test_written_table_reads_back_and_serves_its_bucket(tmp_path, monkeypatch):
    path = tuned.write_table(tmp_path / "t" / "x.json", H100,
                             [entry(REG_CAP=0, PREFETCH=2), entry(M=8, BN=128, BK=256, SPLIT_K=2, ONE_DOT=False)],
                             triton="3.6.0")
    assert not list(path.parent.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert data["device"] == H100 and data["triton"] == "3.6.0" and len(data["configs"]) == 2
    monkeypatch.setenv(tuned.ENV, str(path))
    assert tuned.check_override() == 2
    one = {"BN": 64, "BK": 128, "SPLIT_K": 4, "num_warps": 4, "VEC_X": False, "REG_CAP": 0, "PREFETCH": 2}
    assert tuned.lookup(1, 14336, 4096, 128, 4, H100) == one
    mma = {"BN": 128, "BK": 256, "SPLIT_K": 2, "num_warps": 4, "ONE_DOT": False, "VEC_X": False}
    for m in (5, 8, 16):  # the entry measured at 8 rows serves 5-16
        assert tuned.lookup(m, 14336, 4096, 128, 4, H100) == mma
    piped = tuned.write_table(tmp_path / "piped.json", H100, [entry(STAGES=4)])  # the pipelined GEMV loop
    assert tuned.read_table(piped)[1][0]["STAGES"] == 4
    pdl = tuned.write_table(tmp_path / "pdl.json", H100, [entry(PDL=True)])  # a programmatic dependent launch
    assert tuned.read_table(pdl)[1][0]["PDL"] is True
    # anything else is the heuristic's: other rows, shape, group, bits, GPU model, no GPU
    assert tuned.lookup(2, 14336, 4096, 128, 4, H100) is None
    assert tuned.lookup(17, 14336, 4096, 128, 4, H100) is None
    assert tuned.lookup(1, 4096, 14336, 128, 4, H100) is None
    assert tuned.lookup(1, 14336, 4096, 64, 4, H100) is None
    assert tuned.lookup(1, 14336, 4096, 128, 8, H100) is None
    assert tuned.lookup(1, 14336, 4096, 128, 4, "NVIDIA H200") is None
    assert tuned.lookup(1, 14336, 4096, 128, 4, None) is None


def test_override_wins_over_packaged_table(tmp_path, monkeypatch):
    tuned.write_table(tuned.PACKAGED / "NVIDIA_H100_80GB_HBM3.json", H100,
                      [entry(), entry(N=4096, BN=32)])
    assert tuned.lookup(1, 14336, 4096, 128, 4, H100)["BN"] == 64
    folder = tmp_path / "mine"
    tuned.write_table(folder / "NVIDIA_H100_80GB_HBM3.json", H100, [entry(BN=256, SPLIT_K=1)])
    tuned.write_table(folder / "NVIDIA_H200.json", "NVIDIA H200", [entry(BN=16)])
    monkeypatch.setenv(tuned.ENV, str(folder))
    tuned.clear_cache()
    assert tuned.check_override() == 2
    assert tuned.lookup(1, 14336, 4096, 128, 4, H100)["BN"] == 256  # the override's entry
    assert tuned.lookup(1, 4096, 4096, 128, 4, H100)["BN"] == 32  # the packaged table still serves the rest
    assert tuned.lookup(1, 14336, 4096, 128, 4, "NVIDIA H200")["BN"] == 16
    # an override file made on another GPU model serves nothing here
    monkeypatch.setenv(tuned.ENV, str(folder / "NVIDIA_H200.json"))
    tuned.clear_cache()
    assert tuned.lookup(1, 14336, 4096, 128, 4, H100)["BN"] == 64


def test_swap_kernel_entries_are_served_at_any_row_count(tmp_path, monkeypatch):
    good = [entry(KERNEL="swap", BN=128, num_warps=4), entry(M=16, KERNEL="swap", ONE_DOT=False, STAGES=3),
            entry(M=64, KERNEL="swap", group=4096, BK=128, STAGES=1)]
    tuned.write_table(tmp_path / "NVIDIA_H100_80GB_HBM3.json", H100, good)
    monkeypatch.setenv(tuned.ENV, str(tmp_path))
    tuned.clear_cache()
    assert tuned.lookup(1, 14336, 4096, 128, 4, H100) == {"BN": 128, "BK": 128, "SPLIT_K": 4, "num_warps": 4,
                                                            "VEC_X": False, "KERNEL": "swap"}
    assert tuned.lookup(9, 14336, 4096, 128, 4, H100)["STAGES"] == 3
    assert tuned.lookup(40, 14336, 4096, 4096, 4, H100)["KERNEL"] == "swap"


@pytest.mark.parametrize("bad, why", [
    (entry(BN=48), "'BN' must be a power of two"),
    (entry(M=8, BK=64), "at least 16 of them for the MMA kernel"),
    (entry(M=4, BK=64, KERNEL="mma"), "at least 16 of them for the MMA kernel"),
    (entry(M=8, KERNEL="gemv"), "'KERNEL' must be 'mma', 'swap', or 'gemv' for up to 4 rows"),
    (entry(KERNEL="swap", bits=8, BK=128), "the swap kernel takes 4 bits"),
    (entry(KERNEL="swap", group=64, BK=128), "a 'BK' of 16 values up to the group size"),
    (entry(KERNEL="swap", BK=8), "a 'BK' of 16 values up to the group size"),
    (entry(KERNEL="swap", STAGES=6), "'STAGES' of the swap kernel must be 1-5"),
    (entry(KERNEL="fast"), "'KERNEL' must be"),
    (entry(BK=4), "'BK' must hold whole words"),
    (entry(M=100), "'M' above 64"),
    (entry(bits=3), "'bits' must be 4 or 8"),
    (entry(SPLIT_K=0), "'SPLIT_K' must be a positive integer"),
    (entry(num_warps=3), "'num_warps' must be 1-16"),
    (entry(VEC_X="yes"), "'VEC_X' must be true or false"),
    (entry(PDL=1), "'PDL' must be true or false"),
    (entry(REG_CAP=70), "'REG_CAP' must be 0"),
    (entry(REG_CAP=True), "'REG_CAP' must be 0"),
    (entry(PREFETCH=4), "'PREFETCH' must be 1, 2 or 3"),
    (entry(PREFETCH=True), "'PREFETCH' must be 1, 2 or 3"),
    (entry(STAGES=1), "'STAGES' must be 0 or 2-5"),
    (entry(STAGES=3, PREFETCH=2), "'STAGES' must be 0 or 2-5"),
    (entry(M=8, STAGES=0), "'STAGES' of the MMA kernel must be 2-5"),
    ({k: v for k, v in entry().items() if k != "N"}, "'N' must be a positive integer"),
])
def test_bad_entries_are_refused_with_the_reason(tmp_path, bad, why):
    """(The swap kernel's entries: INT4, a K tile inside one group, 1-5 stages, any row count.)"""
    with pytest.raises(ValueError, match=why):
        tuned.write_table(tmp_path / "t.json", H100, [bad])
    assert not (tmp_path / "t.json").exists()
    (tmp_path / "t.json").write_text(json.dumps({"device": H100, "configs": [bad]}))
    with pytest.raises(ValueError, match=f"t.json: config .*{why}"):
        tuned.read_table(tmp_path / "t.json")


def test_unreadable_tables_and_missing_override(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="a.json: not a readable JSON kernel-config table"):
        tuned.read_table(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"configs": []}))
    with pytest.raises(ValueError, match="needs a 'device' name and a 'configs' list"):
        tuned.read_table(tmp_path / "b.json")
    monkeypatch.setenv(tuned.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="INFERKIT_KERNEL_CONFIGS=.*nowhere: no such file or folder"):
        tuned.check_override()
    with pytest.raises(ValueError, match="no such file or folder"):
        tuned.lookup(1, 14336, 4096, 128, 4, H100)


def test_runtime_refuses_a_bad_override_before_loading(tmp_path, monkeypatch):
    from inferkit.errors import InferkitError
    from inferkit.runtime.config import EngineConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "t.json").write_text(json.dumps({"device": H100, "configs": [entry(BN=48)]}))
    monkeypatch.setenv(tuned.ENV, str(tmp_path / "t.json"))
    with pytest.raises(InferkitError, match="'BN' must be a power of two"):
        EngineConfig(device="cpu", linear_backend="triton").backends()
    assert EngineConfig(device="cpu").backends() == ("packed", "torch")  # the tables concern Triton only


def test_packaged_tables_are_valid_and_named_after_their_gpu():
    from pathlib import Path

    folder = Path(tuned.__file__).with_name("configs")
    assert (folder / "README.md").is_file()
    for path in folder.glob("*.json"):
        device, entries = tuned.read_table(path)
        assert path.stem == tuned.slug(device) and entries


def test_pdl_chain_script_checks_its_chains(tmp_path):
    """benchmarks/gpu_pdl_chain.py (``GPU_PARTS=chain``) on the CPU (the interpreter, a 256/512
    model): the INT4 chains give the same bits launched plain and as PDL, near the bf16 chain on
    the weights they stand for, and every chain is timed into the JSON."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "chain.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_pdl_chain.py"), "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("INT4 = INT4 as PDL") == 3
    results = json.loads(out.read_text())
    assert results["device"] == "cpu (check)" and (results["hidden"], results["intermediate"]) == (256, 512)
    assert set(results["chains"]) == {"up", "norm+up", "mlp"}
    for row in results["chains"].values():
        assert all(row[k] > 0 for k in ("bf16_us", "int4_us", "int4_pdl_us", "int4_default_us"))
        assert row["int4_pdl_speedup"] == round(row["bf16_us"] / row["int4_pdl_us"], 3)


@pytest.mark.parametrize("grid", ["swap", "prefetch", "next"])
def test_int4_sweep_script_checks_each_config_and_names_the_fastest(tmp_path, grid):
    """benchmarks/gpu_int4_sweep.py (``GPU_PARTS=sweep``) runs only when a GPU is lent: on the CPU
    (the interpreter, a 256x64 problem, the grid's first configs) it checks that the script still
    runs its grid after the heuristic's config, checks every config against the reference, and
    names the fastest as a table entry with its speedup over bf16."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_int4_sweep.py"), "--grid", grid,
                          "--out", str(out)], capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu (check)" and len(results["shapes"]) == 1
    entry = results["shapes"][0]
    rows = entry["rows"]
    assert (entry["K"], entry["N"]) == (256, 64) and len(rows) >= 4
    assert all(r["error"] is None and r["us"] > 0 and r["rel_err"] < 1e-2 for r in rows), rows
    kernels = [r.get("KERNEL", "gemv") for r in rows]
    assert kernels[0] == "gemv" and "KERNEL" not in rows[0] and entry["heuristic_us"] == rows[0]["us"]
    if grid == "swap":
        assert kernels[1:4] == ["swap"] * 3 and all(r["ONE_DOT"] for r in rows[1:4])  # the joined tiles first
    elif grid == "next":  # each config, then the same as a programmatic dependent launch; swap and GEMV loops alternate
        assert len(rows) == 6 and [r.get("PDL", False) for r in rows] == [False, True] * 3
        plain = lambda r: {k: v for k, v in r.items() if k not in ("PDL", "us", "rel_err", "error")}  # noqa: E731
        assert all(plain(rows[i]) == plain(rows[i + 1]) for i in (0, 2, 4))
        assert kernels[2:6] == ["swap", "swap", "gemv", "gemv"] and ("STAGES" in rows[4] or "PREFETCH" in rows[4])
        assert entry["best_pdl_us"] == min(r["us"] for r in rows[1::2]) and "as a programmatic dependent" in run.stdout
    else:
        assert set(kernels) == {"gemv"} and any("STAGES" in r or "PREFETCH" in r for r in rows)
    fastest = min(rows, key=lambda r: r["us"])
    best = entry["best"]
    assert best["us"] == pytest.approx(fastest["us"], abs=0.01) and best["M"] == 1 and best["K"] == 256
    assert (best["BN"], best["SPLIT_K"], best["num_warps"], best.get("KERNEL")) == (
        fastest["BN"], fastest["SPLIT_K"], fastest["num_warps"], fastest.get("KERNEL"))
    assert entry["best_speedup"] == pytest.approx(entry["bf16_graphed_us"] / best["us"])
    assert f"{entry['best_speedup']:.2f}x bf16 (>= 2.5x: NOT met)" in run.stdout


def test_gpu_benchmark_smoke_writes_a_table_the_runtime_reads(tmp_path):
    """benchmarks/gpu_kernels.py runs only when a GPU is lent: its --smoke mode (tiny shapes, the
    CPU interpreter) checks that the script, its sweep and the table it writes still work."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = tmp_path / "bench" / "gpu_kernels.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_kernels.py"), "--smoke", "--skip-e2e",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [(r["K"], r["N"], r["M"]) for r in results["matmul"]] == [(256, 128, 1), (256, 128, 8), (256, 128, 32)]
    assert all(r["int4_rel_err"] < 2e-2 and r["tuned_graphed_int4_us"] > 0 for r in results["matmul"])
    assert [(r["cached"], r["new_tokens"]) for r in results["prefill"]] == [(0, 24), (8, 24)]
    assert all(r["rel_err_vs_torch"] < 2e-2 for r in results["prefill"])
    device, entries = tuned.read_table(Path(results["tuned_table"]))
    assert device == "cpu (smoke)" and Path(results["tuned_table"]).name == "cpu_smoke.json"
    sweep = results["int4_config_sweep"]
    assert [e["M"] for e in entries] == [1, 4, 8, 32]
    for e in entries:  # each entry is the fastest of its row count's swept configs (interpreter times)
        swept = [r for r in sweep if r["M"] == e["M"]]
        fastest = min(swept, key=lambda r: r["graphed_int4_us"])
        assert (e["BN"], e["BK"], e["SPLIT_K"], e.get("KERNEL")) == (fastest["BN"], fastest["BK"], fastest["SPLIT_K"],
                                                                   fastest.get("KERNEL"))
        assert [r["picked"] for r in swept][0] and sum(r["picked"] for r in swept) == 1  # the heuristic's, first
        assert any(r["BN"] == 16 and r["SPLIT_K"] == 2 for r in swept)  # and a tiny split config
    # at 4 rows both kernels were tried (and checked against the reference before timing)
    assert sorted({r.get("KERNEL", "gemv") for r in sweep if r["M"] == 4}) == ["gemv", "mma", "swap"]
    assert "int4 best swept" in run.stdout
