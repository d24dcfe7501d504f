"""Fuzzed recipes and damaged artifacts: the recipe loader and the runtime's artifact loader end
in a recipe, or a clear InferkitError, never another exception (hypothesis, fixed seed)."""

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferkit.config import QuantizeConfig, Recipe, load_recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
MUTATION = dict(op=st.sampled_from(["truncate", "flip", "insert", "replace"]), where=st.floats(0, 1),
                junk=st.binary(min_size=1, max_size=12))


def mutate(data: bytes, op: str, where: float, junk: bytes) -> bytes:
    data = bytearray(data)
    at = min(int(where * len(data)), len(data) - 1)
    if op == "truncate":
        return bytes(data[:at])
    if op == "flip":
        data[at] ^= junk[0] or 1
    elif op == "insert":
        data[at:at] = junk
    else:
        return junk
    return bytes(data)


def test_mutated_recipes_load_or_fail_clearly(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    originals = [r.read_bytes() for r in RECIPES]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(which=st.integers(0, len(originals) - 1), **MUTATION)
    def check(which, op, where, junk):
        path.write_bytes(mutate(originals[which], op, where, junk))
        try:
            assert isinstance(load_recipe(path), Recipe)
        except InferkitError as exc:
            assert "\n" not in str(exc).strip()

    check()


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    from inferkit.stages.quantize import run_quantize

    out = tmp_path_factory.mktemp("fuzz-art") / "w4"
    run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32),
                                         calibration=CalibrationConfig(source="seed", num_samples=4, seq_len=32)), out)
    return out


def test_damaged_artifacts_are_refused_by_the_runtime(artifact, tmp_path_factory):
    from inferkit.runtime import LLM

    base = tmp_path_factory.mktemp("fuzz-rt")
    names = ["inferkit.json", "config.json", "model.safetensors", "tokenizer.json"]
    originals = {n: (artifact / n).read_bytes() for n in names}
    folder = base / "a"
    shutil.copytree(artifact, folder)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(name=st.sampled_from(names), **MUTATION)
    def check(name, op, where, junk):
        for n in names:
            (folder / n).write_bytes(originals[n])
        (folder / name).write_bytes(mutate(originals[name], op, where, junk))
        with pytest.raises(InferkitError):
            LLM(folder, num_kv_blocks=8)

    check()
