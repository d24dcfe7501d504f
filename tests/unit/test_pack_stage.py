"""inferkit pack: the assembled folder verifies, serves with its draft, archives with the manifest
first, and bad inputs are refused before anything is written."""

import importlib.util
import json
import shutil
import tarfile

import pytest
import torch
from safetensors.torch import save_file

from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.stages.pack import pack
from inferkit.stages.quantize import run_quantize
from inferkit.stages.verify import verify_artifact

SERVE = {"passed": True, "device": "cpu", "threads": 2, "torch": "2.x",
         "quality": {"perplexity": 10.5, "reference_perplexity": 10.4, "reference": "the source", "agreement": 0.97},
         "load": {"requests": 64, "throughput_tok_s": 80.0, "ttft_ms_p50": 120.0, "itl_ms_p50": 30.0, "preemptions": 0,
                  "kv_utilisation": 0.95}, "memory": {"kv_utilisation": 0.95}}


@pytest.fixture(scope="module")
def parts(tiny_llama, tmp_path_factory):
    from inferkit.stages.distill import build_student

    root = tmp_path_factory.mktemp("pack")
    art = root / "w4"
    run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32),
                                         calibration=CalibrationConfig(source="seed", num_samples=4, seq_len=32)), art)
    draft = build_student(tiny_llama, 1, root / "draft")
    save_file({"d2t": torch.arange(0, 384, 2)}, str(draft / "draft_vocab.safetensors"))
    (draft / "distill.json").write_text(json.dumps({"acceptance_before": {"acceptance_rate": 0.0},
                                                    "acceptance_after": {"acceptance_rate": 0.4}}))
    serve = root / "serve"
    serve.mkdir()
    (serve / "report.json").write_text(json.dumps(SERVE))
    (serve / "junit.xml").write_text("<testsuite/>")
    scan = root / "scan.json"
    scan.write_text("{}")
    return art, draft, serve, scan


def test_pack_assembles_a_verified_servable_artifact(parts, tmp_path):
    from transformers import AutoModelForCausalLM

    from inferkit.runtime import LLM, SamplingParams

    art, draft, serve, scan = parts
    out = tmp_path / "final"
    manifest = pack(art, out, draft=draft, serve_test=serve, reports=[scan], archive=True)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "draft/config.json",
              "draft/draft_vocab.safetensors", "reports/serve-test.json", "reports/serve-test.junit.xml",
              "reports/scan.json"):
        assert f in manifest["files"], f
    assert manifest["stage"] == "pack" and manifest["draft"]["vocabulary"] == "192 of 384 tokens"
    report = verify_artifact(out)
    assert report.ok, report.errors
    card = (out / "README.md").read_text()
    assert "bits per weight" in card and "| int4-g32-sym |" in card and "PASSED" in card and "0.400" in card
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(out).generate([[5, 6, 7]], greedy)[0].token_ids
    spec = LLM(out, draft=str(out / "draft"), num_speculative_tokens=2)
    assert spec.generate([[5, 6, 7]], greedy)[0].token_ids == plain
    assert AutoModelForCausalLM.from_pretrained(out / "draft").config.num_hidden_layers == 1  # a plain HF model
    if importlib.util.find_spec("zstandard"):  # .tar.zst then: read it through zstandard
        import zstandard

        with open(tmp_path / "final.tar.zst", "rb") as fh:
            (tmp_path / "final.tar").write_bytes(zstandard.ZstdDecompressor().stream_reader(fh).read())
    with tarfile.open(tmp_path / "final.tar") as tar:
        names = tar.getnames()
        assert names[0] == "final/inferkit.json" and len(names) == len(manifest["files"]) + 1
        tar.extractall(tmp_path / "x", filter="data")
    assert verify_artifact(tmp_path / "x" / "final").ok


def test_pack_refuses_bad_inputs_and_writes_nothing(parts, tiny_model_factory, tmp_path):
    art, draft, serve, _ = parts
    damaged = tmp_path / "damaged"
    shutil.copytree(art, damaged)
    (damaged / "tokenizer.json").write_text("{}")
    with pytest.raises(InferkitError, match="fails verification"):
        pack(damaged, tmp_path / "o1")
    other = tiny_model_factory("other", vocab_size=200)
    with pytest.raises(InferkitError, match="draft's vocabulary has 200 tokens, the model's 384"):
        pack(art, tmp_path / "o2", draft=other)
    with pytest.raises(InferkitError, match="has no report.json"):
        pack(art, tmp_path / "o3", serve_test=tmp_path)
    with pytest.raises(InferkitError, match="does not exist"):
        pack(art, tmp_path / "o4", reports=[tmp_path / "nope.json"])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    pack(art, tmp_path / "o5")
    with pytest.raises(InferkitError, match="--overwrite"):
        pack(art, tmp_path / "o5")
    pack(art, tmp_path / "o5", overwrite=True)


def test_pack_cli(parts, tmp_path):
    from typer.testing import CliRunner

    from inferkit.cli.main import app

    art, draft, serve, _ = parts
    result = CliRunner().invoke(app, ["pack", str(art), "-o", str(tmp_path / "p"), "--draft", str(draft),
                                      "--serve-test", str(serve)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["pack", str(tmp_path / "missing"), "-o", str(tmp_path / "q")])
    assert result.exit_code == 1 and "Traceback" not in result.output
