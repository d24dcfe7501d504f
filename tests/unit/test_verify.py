"""inferkit verify: every kind of damage is reported, a clean artifact passes, and the
tensor-parallel degrees follow the group size and head counts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from inferkit.artifacts import MANIFEST, hash_files, manifest_digest
from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.stages.quantize import run_quantize
from inferkit.stages.verify import verify_artifact

CALIB = CalibrationConfig(source="seed", num_samples=4, seq_len=32)


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    """W4 g32 asymmetric with down_proj in INT8: two config groups, zero points, a mixed config."""
    out = tmp_path_factory.mktemp("verify") / "w4"
    run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=False,
                                                                 overrides={"mlp.down_proj": "int8-ch-sym"}),
                                         calibration=CALIB), out)
    return out


@pytest.fixture()
def copy(artifact, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(artifact, dst)
    return dst


def rewrite_manifest(folder):
    """Re-hash the files as a writer would: only the tensor-level checks can object then."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = hash_files(folder)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_a_clean_artifact_passes(artifact):
    report = verify_artifact(artifact)
    assert report.ok, report.errors
    assert report.files_checked >= 4 and report.tensors_checked > 20 and not report.warnings


def test_a_flipped_byte_in_the_weights(copy):
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    report = verify_artifact(copy)
    assert not report.ok and any("model.safetensors: sha256" in e and "does not match" in e for e in report.errors)


def test_a_missing_file_and_an_uncovered_one(copy):
    (copy / "tokenizer.json").unlink()
    (copy / "notes.txt").write_text("added later")
    errors = verify_artifact(copy).errors
    assert "tokenizer.json: listed in the manifest but missing" in errors
    assert "notes.txt: not covered by the manifest" in errors


def test_an_extra_tensor_with_a_consistent_manifest(copy):
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.layers.0.mlp.extra"] = torch.zeros(3)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    rewrite_manifest(copy)
    assert verify_artifact(copy).errors == ["tensor model.layers.0.mlp.extra is not part of the model"]


def test_missing_wrong_shape_and_wrong_dtype_tensors(copy):
    tensors = load_file(str(copy / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight_zero_point"]
    tensors["model.layers.0.mlp.gate_proj.weight_scale"] = tensors["model.layers.0.mlp.gate_proj.weight_scale"][:, :1].contiguous()
    tensors["model.layers.0.mlp.up_proj.weight_packed"] = tensors["model.layers.0.mlp.up_proj.weight_packed"].float()
    tensors["model.layers.0.self_attn.o_proj.weight_shape"] = torch.tensor([64, 65])
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    rewrite_manifest(copy)
    errors = verify_artifact(copy).errors
    assert "tensor model.layers.1.self_attn.q_proj.weight_zero_point is missing" in errors
    assert "tensor model.layers.0.mlp.gate_proj.weight_scale: shape [96, 1], expected [96, 2]" in errors
    assert "tensor model.layers.0.mlp.up_proj.weight_packed: dtype F32, expected I32" in errors
    assert "tensor model.layers.0.self_attn.o_proj.weight_shape: [64, 65], the layer is [64, 64]" in errors
    assert len(errors) == 4


def test_a_manifest_edited_by_hand(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["recipe"] = {"edited": True}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert verify_artifact(copy).errors == [f"{MANIFEST} was edited after it was written (its own hash does not match)"]
    (copy / MANIFEST).write_text("{ not json")
    assert any("not valid JSON" in e for e in verify_artifact(copy).errors)
    (copy / MANIFEST).unlink()
    assert any("no inferkit.json" in e for e in verify_artifact(copy).errors)


def test_config_and_tensors_disagree(copy):
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.layers.0.mlp.gate_proj")
    (copy / "config.json").write_text(json.dumps(config))
    rewrite_manifest(copy)
    errors = verify_artifact(copy).errors
    assert any("model.layers.0.mlp.gate_proj: packed tensors present but no config group targets it" in e for e in errors)


def test_tensor_parallel_degrees_follow_groups_and_heads(artifact):
    tp = verify_artifact(artifact).tensor_parallel
    # tiny llama: 4 heads / 2 KV heads, intermediate 96 (down_proj INT8 per channel), hidden 64 (o_proj g32)
    assert tp[1] == [] and tp[2] == []
    assert "4 attention heads do not divide by 8" in tp[8]
    assert any("o_proj: 16 inputs per shard are not whole groups of 32" in r for r in tp[4])


def test_cli_exit_codes_and_json(artifact, copy, tmp_path):
    from typer.testing import CliRunner

    from inferkit.cli.main import app

    result = CliRunner().invoke(app, ["verify", str(artifact), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    (copy / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "tokenizer.json" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "is not a folder" in result.output


def test_not_a_model_folder(tmp_path):
    with pytest.raises(InferkitError, match="no config.json"):
        verify_artifact(tmp_path)


def test_fuzzed_artifacts_end_in_a_report_or_a_clear_error(artifact, tmp_path_factory):
    """Hundreds of mutated and truncated manifests, configs and weight files: each is reported
    as damaged (or refused with an InferkitError), never a traceback or a pass."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = tmp_path_factory.mktemp("fuzz")
    names = [MANIFEST, "config.json", "model.safetensors"]
    originals = {n: (artifact / n).read_bytes() for n in names}

    @settings(max_examples=240, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(name=st.sampled_from(names), op=st.sampled_from(["truncate", "flip", "insert", "replace"]),
           where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=16))
    def check(name, op, where, junk):
        folder = base / "a"
        if not folder.exists():
            shutil.copytree(artifact, folder)
        for n in names:
            (folder / n).write_bytes(originals[n])
        data = bytearray(originals[name])
        at = min(int(where * len(data)), len(data) - 1)
        if op == "truncate":
            data = data[:at]
        elif op == "flip":
            data[at] ^= junk[0] or 1
        elif op == "insert":
            data[at:at] = junk
        else:
            data = bytearray(junk)
        (folder / name).write_bytes(bytes(data))
        same_meaning = False
        if name == MANIFEST:  # e.g. a space inserted: the same manifest, nothing to report (other files are hashed)
            try:
                same_meaning = json.loads(bytes(data)) == json.loads(originals[name])
            except ValueError:
                pass
        try:
            report = verify_artifact(folder)
        except InferkitError:
            assert not same_meaning
            return
        assert report.ok == same_meaning, (name, op, report.errors)

    check()
