"""Load a causal LM and its tokenizer from a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from inferkit.errors import InferkitError
from inferkit.models.artifact import is_quantized_artifact, load_artifact_model
from inferkit.models.lazy import LazyWeights, build_lazy_model

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelSource:
    """Where a model comes from: a folder, or a GGUF file inside a folder."""

    folder: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    # Set when the decoder linears were left on the meta device (``load_model(lazy=True)``).
    weights: LazyWeights | None = None

    def load_weights(self, linears: dict[str, torch.nn.Linear]) -> None:
        """Make sure ``linears`` hold their weights (a no-op for a model loaded whole)."""
        if self.weights is not None:
            self.weights.load(linears)

    def offload_embeddings(self) -> None:
        """Free the input embeddings (and a head tied to them) of a lazily loaded model until
        :meth:`restore_embeddings`: layer-wise stages need them only to embed the samples."""
        if self.weights is not None:
            self.weights.offload_embeddings(self.model)

    def restore_embeddings(self) -> None:
        if self.weights is not None:
            self.weights.restore_embeddings(self.model)


def resolve_model_path(path: str | os.PathLike) -> ModelSource:
    """Check that ``path`` is a model folder or a .gguf file, or raise a clear error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InferkitError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise InferkitError(f"{p} is a file but not a .gguf; pass a model folder or a .gguf file")
        return ModelSource(p.parent, p.name)
    if (p / "config.json").is_file():
        return ModelSource(p)
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(p, ggufs[0])
    if len(ggufs) > 1:
        raise InferkitError(f"{p} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise InferkitError(f"{p} is not a model folder: no config.json and no .gguf file in it")


def check_architecture(model_type: str | None) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise InferkitError(
            f"unsupported architecture {model_type!r}; inferkit supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _read_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        if source.gguf_file:
            _require_gguf()
            return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
        raw = json.loads((source.folder / "config.json").read_text())
        if "model_type" not in raw:
            raise InferkitError(f"{source.folder}/config.json has no model_type; is it a transformers model?")
        check_architecture(raw["model_type"])
        return AutoConfig.from_pretrained(source.folder, trust_remote_code=False)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise InferkitError(f"cannot read the model config at {source.display}: {_first_line(exc)}") from exc


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise InferkitError("reading .gguf files needs the gguf package: pip install gguf") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, tokenizer: bool = True,
               lazy: bool = False) -> LoadedModel:
    """Load weights (dequantized from GGUF if need be) as a plain float model, in eval mode.

    With ``lazy``, a safetensors checkpoint's decoder linear weights stay on the meta device
    until ``LoadedModel.load_weights`` asks for them (see ``inferkit.models.lazy``); GGUF files
    and quantized artifacts are always loaded whole.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve_model_path(path)
    config = _read_config(source)
    check_architecture(getattr(config, "model_type", None))
    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    weights = None
    try:
        if source.gguf_file is None and is_quantized_artifact(source.folder):
            model = load_artifact_model(source.folder, dtype)
        elif source.gguf_file is None and lazy and (built := build_lazy_model(config, source.folder, dtype)):
            model, weights = built
            model.generation_config = _generation_config(source.folder, model.generation_config)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
        tok = AutoTokenizer.from_pretrained(source.folder, **({"gguf_file": source.gguf_file} if source.gguf_file else {})) if tokenizer else None
    except (OSError, ValueError, RuntimeError) as exc:
        raise InferkitError(f"cannot load the model at {source.display}: {_first_line(exc)}") from exc
    if source.gguf_file:
        model = _drop_gguf_marker(model)
    model.eval()
    return LoadedModel(model, tok, source, weights)


def _generation_config(folder: Path, default):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return default


def _drop_gguf_marker(model):
    """GGUF weights arrive dequantized but flagged as quantized; rebuild a plain model."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()
