import json

import pytest
import torch
from transformers import AutoTokenizer

from inferkit.data.calibration import CalibrationConfig, build_samples, load_documents, render
from inferkit.data.sources import registry
from inferkit.errors import InferkitError


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_same_options_give_identical_samples(tok):
    cfg = CalibrationConfig(num_samples=6, seq_len=32, seed=3)
    a, b = build_samples(cfg, tok), build_samples(cfg, tok)
    assert a.shape == (6, 32) and a.dtype == torch.int64
    assert a.numpy().tobytes() == b.numpy().tobytes()
    c = build_samples(CalibrationConfig(num_samples=6, seq_len=32, seed=4), tok)
    assert not torch.equal(a, c)


def test_builtin_sets_work_offline_and_split(tok):
    assert {"builtin", "pydoc", "seed"} <= set(registry())
    train = load_documents(CalibrationConfig(source="builtin"))
    held = load_documents(CalibrationConfig(source="builtin", split="heldout"))
    everything = load_documents(CalibrationConfig(source="builtin", split="all"))
    assert len(train) + len(held) == len(everything)
    assert len(held) == len(everything) // 10
    assert not {json.dumps(d) for d in held} & {json.dumps(d) for d in train}
    assert any(isinstance(d, list) for d in everything)  # chat records are kept as messages


def test_chat_template_applied_to_chat_records(tok):
    chats = [d for d in load_documents(CalibrationConfig(source="seed", split="all")) if isinstance(d, list)]
    rendered = render(chats[0], tok, apply_chat_template=True)
    assert rendered.startswith("<|") and "<|end|>" in rendered
    plain = render(chats[0], tok, apply_chat_template=False)
    assert "<|end|>" not in plain and plain.split(":")[0] in ("system", "user")


def test_local_files(tmp_path, tok):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 200)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record {i} " * 20}) for i in range(12)))
    assert load_documents(CalibrationConfig(source=str(txt))) == [txt.read_text()]
    docs = load_documents(CalibrationConfig(source=str(jsonl), text_field="body", split="all"))
    assert docs[3] == "record 3 " * 20
    assert build_samples(CalibrationConfig(source=str(txt), num_samples=2, seq_len=16), tok).shape == (2, 16)
    with pytest.raises(InferkitError, match="neither 'text' nor 'messages'"):
        load_documents(CalibrationConfig(source=str(jsonl)))


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(5)]}), path)
    assert load_documents(CalibrationConfig(source=str(path))) == [f"row {i}" for i in range(5)]


def test_missing_file_and_unreachable_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InferkitError, match="does not exist"):
        load_documents(CalibrationConfig(source="/nope/calib.jsonl"))
    with pytest.raises(InferkitError, match="cannot load dataset 'someone/no-such-dataset'.*hub may be unreachable"):
        load_documents(CalibrationConfig(source="someone/no-such-dataset"))


def test_too_short_source(tmp_path, tok):
    txt = tmp_path / "short.txt"
    txt.write_text("tiny")
    with pytest.raises(InferkitError, match="fewer than one window of 64"):
        build_samples(CalibrationConfig(source=str(txt), seq_len=64), tok)
