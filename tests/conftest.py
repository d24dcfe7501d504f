"""Shared fixtures: tiny random Llama-family models with a locally trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
)


def _train_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the seed set: no hub, a few hundred tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for name in ("chat", "code", "prose"):
        for line in (REPO / "calibration_data" / "seed" / f"{name}.jsonl").read_text().splitlines():
            corpus.append(line)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            eos_token_id=0, pad_token_id=1, bos_token_id=0)


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, "tie_word_embeddings": arch != "mistral", **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # larger weights than the default init, so quantization error shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _train_tokenizer(folder)
    return folder


@pytest.fixture()
def tiny_model_factory(tmp_path):
    """``make(name, arch="llama", **config_overrides)`` → a fresh tiny model folder."""
    return lambda name, arch="llama", **kw: make_tiny_model(tmp_path / name, arch, **kw)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory) -> Path:
    """Same architecture as ``tiny_llama``, other weights: a different model to its fingerprint."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama-other", "llama", seed=1)


@pytest.fixture(scope="session")
def w4_mixed_artifact(tiny_llama, tmp_path_factory) -> Path:
    """``tiny_llama`` quantized RTN INT4 g32 asymmetric, down_proj INT8 per channel (symmetric)."""
    from inferkit.config import QuantizeConfig, Recipe
    from inferkit.data.calibration import CalibrationConfig
    from inferkit.stages.quantize import run_quantize

    path = tmp_path_factory.mktemp("art") / "mixed"
    run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=False,
                                                                 batch_size=4, overrides={"mlp.down_proj": "int8-ch-sym"}),
                                         calibration=CalibrationConfig(source="seed", num_samples=8, seq_len=64)), path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model(root / arch, arch, seed=i) for i, arch in enumerate(("llama", "mistral", "qwen2"))}


@pytest.fixture()
def seed_text_file(tmp_path) -> Path:
    """A local text file for calibration and evaluation, written from the seed set."""
    lines = []
    for name in ("prose", "code"):
        for row in (REPO / "calibration_data" / "seed" / f"{name}.jsonl").read_text().splitlines():
            lines.append(json.loads(row)["text"])
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(lines * 3))
    return path
