import json

import pytest

from inferkit.errors import InferkitError
from inferkit.models import load_model, resolve_model_path


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_loads_llama_family(tiny_models, arch):
    loaded = load_model(tiny_models[arch])
    assert loaded.model.config.model_type == arch
    ids = loaded.tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 384)
    assert not loaded.model.training


def test_missing_path(tmp_path):
    with pytest.raises(InferkitError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InferkitError, match="is not a model folder: no config.json and no .gguf"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(InferkitError, match="not a .gguf"):
        load_model(f)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(InferkitError, match="unsupported architecture 'gpt2'; inferkit supports llama, mistral, qwen2"):
        load_model(tmp_path)


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InferkitError, match="cannot read the model config"):
        load_model(tmp_path)


def test_several_gguf_files_are_ambiguous(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(InferkitError, match="several .gguf files"):
        resolve_model_path(tmp_path)


def test_weights_missing(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(InferkitError, match="cannot load the model"):
        load_model(tmp_path, tokenizer=False)
