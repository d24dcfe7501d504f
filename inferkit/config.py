"""Recipes: dataclasses validated on construction, loaded from YAML; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.quant.scheme import QuantFormat, parse_format

METHODS = ("gptq", "rtn")
SCALE_DTYPES = ("model", "float16", "bfloat16", "float32")
SCAN_MODES = ("block", "kl", "proxy")
EVAL_DEFAULTS = {"block": (8, 512), "kl": (4, 256), "proxy": (0, 0)}


@dataclass(frozen=True, slots=True)
class QuantizeConfig:
    """What to quantize and how. ``group_size`` None means per-channel scales."""

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    damp: float = 0.01
    block_size: int = 128
    actorder: bool = False
    scale_search: bool = False
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: dict = field(default_factory=dict)  # layer pattern → format name or "skip"
    batch_size: int = 2
    # Mixed precision: a format per layer from a sensitivity scan, within this many bits per
    # weight (or at most this summed sensitivity); formats and scan settings in ``sensitivity``.
    target_bpw: float | None = None
    max_cost: float | None = None
    # dtype the scales are stored in: "model" (the checkpoint's compute dtype), float16,
    # bfloat16 or float32. 16-bit scales cost half the bits (int4-g32: 4.5 instead of 5.0 bits).
    scale_dtype: str = "model"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InferkitError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.format  # validates bits and group size
        for pattern, fmt in self.overrides.items():
            if fmt != "skip":
                parse_format(str(fmt))
            _compile(pattern)
        if self.batch_size < 1:
            raise InferkitError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise InferkitError(f"unknown scale_dtype {self.scale_dtype!r}; choose one of {', '.join(SCALE_DTYPES)}")
        if self.target_bpw is not None and self.max_cost is not None:
            raise InferkitError("give target_bpw or max_cost, not both")
        if self.target_bpw is not None and not self.target_bpw > 0:
            raise InferkitError(f"target_bpw must be positive, got {self.target_bpw}")

    def scale_torch_dtype(self, model_dtype):
        """The torch dtype scales are stored in, for a model computing in ``model_dtype``."""
        import torch

        return model_dtype if self.scale_dtype == "model" else getattr(torch, self.scale_dtype)

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size, self.symmetric)

    def format_for(self, name: str) -> QuantFormat | None:
        """The format of linear layer ``name``, or None to keep it in full precision."""
        for pattern, fmt in self.overrides.items():
            if matches(pattern, name):
                return None if fmt == "skip" else parse_format(str(fmt))
        if any(matches(p, name) for p in self.ignore):
            return None
        return self.format


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """How to scan. Formats without ``-sym``/``-asym`` take the recipe's symmetry."""

    mode: str = "block"
    formats: tuple[str, ...] = ("int8-ch", "int4-g32", "int4-g64", "int4-g128")
    eval_samples: int = 0  # 0: the mode's default (block 8, kl 4)
    eval_seq_len: int = 0  # 0: the mode's default (block 512, kl 256)
    tie: bool = True  # plan q/k/v and gate/up as one unit each, as serving engines fuse them

    def __post_init__(self) -> None:
        if self.mode not in SCAN_MODES:
            raise InferkitError(f"unknown scan mode {self.mode!r}; choose one of {', '.join(SCAN_MODES)}")
        if not self.formats:
            raise InferkitError("the scan needs at least one candidate format")
        for name in self.formats:
            parse_format(name)
        if self.eval_samples < 0 or self.eval_seq_len < 0:
            raise InferkitError("eval_samples and eval_seq_len must be positive (0 for the default)")

    def eval_shape(self) -> tuple[int, int]:
        n, seq = EVAL_DEFAULTS[self.mode]
        return self.eval_samples or n, self.eval_seq_len or seq


def _compile(pattern: str) -> re.Pattern | None:
    if not pattern.startswith("re:"):
        return None
    try:
        return re.compile(pattern[3:])
    except re.error as exc:
        raise InferkitError(f"bad layer pattern {pattern!r}: {exc}") from exc


def matches(pattern: str, name: str) -> bool:
    """``re:REGEX`` (full match), an exact name, or a dotted suffix such as ``mlp.down_proj``."""
    if pattern.startswith("re:"):
        return _compile(pattern).fullmatch(name) is not None
    return name == pattern or name.endswith("." + pattern)


@dataclass(frozen=True, slots=True)
class ServeTestConfig:
    """``inferkit serve-test``: what to measure, the engine it runs, and the pass/fail thresholds."""

    # Quality: perplexity on a text and greedy agreement with a reference model.
    text: str | None = None  # a text file; None: the built-in calibration set's held-out split
    windows: int = 8
    window_size: int = 512
    reference: str | None = None  # None: the artifact's own weights dequantized, run by transformers
    agreement_prompts: int = 8
    agreement_tokens: int = 32
    # Load test.
    num_requests: int = 64
    prompt_len: tuple[int, int] = (32, 256)
    output_len: tuple[int, int] = (16, 128)
    request_rate: float | None = None  # requests per second, Poisson arrivals; None: all at once
    seed: int = 0
    # Engine.
    kv_cache_gb: float = 1.0
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    linear_backend: str = "auto"  # auto: triton on CUDA, packed on the CPU; torch: exact dequantize + matmul
    pdl: bool = False  # quantized matmuls as programmatic dependent launches (triton linears, sm_90+)
    # Speculative decoding: a draft model folder, and draft tokens per step.
    draft: str | None = None
    num_speculative_tokens: int = 4
    # Thresholds; None: reported, not checked.
    min_agreement: float | None = 0.95
    max_ppl_increase: float | None = 1.0  # percent over the reference
    min_throughput: float | None = None  # generated tokens per second
    max_ttft_p99_ms: float | None = None
    max_itl_p99_ms: float | None = None
    min_kv_utilisation: float | None = None
    max_peak_rss_mb: float | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise InferkitError(f"serve_test.{name} must be [min, max] with 1 <= min <= max, got {list(lo_hi)}")
            object.__setattr__(self, name, (int(lo_hi[0]), int(lo_hi[1])))
        for name in ("windows", "window_size", "agreement_prompts", "agreement_tokens", "num_requests"):
            if getattr(self, name) < 1:
                raise InferkitError(f"serve_test.{name} must be at least 1, got {getattr(self, name)}")
        if self.window_size < 2:
            raise InferkitError("serve_test.window_size must be at least 2")
        if self.request_rate is not None and self.request_rate <= 0:
            raise InferkitError(f"serve_test.request_rate must be positive, got {self.request_rate}")
        if not isinstance(self.pdl, bool):
            raise InferkitError(f"serve_test.pdl must be true or false, got {self.pdl!r}")

    def engine_options(self) -> dict:
        keys = ("kv_cache_gb", "num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "enable_prefix_caching", "device", "dtype", "linear_backend", "pdl")
        options = {k: getattr(self, k) for k in keys}
        if self.draft:
            options.update(draft=self.draft, num_speculative_tokens=self.num_speculative_tokens)
        return options


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    model: str | None = None
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sensitivity: ScanConfig = field(default_factory=ScanConfig)
    serve_test: ServeTestConfig = field(default_factory=ServeTestConfig)
    # `inferkit run` only: a draft to distil (DistillConfig's fields plus student_layers, student,
    # eval_prompts, eval_data) and pack options (archive); None: no such stage.
    distill: dict | None = None
    pack: dict | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["quantize"]["ignore"] = list(self.quantize.ignore)
        data["sensitivity"]["formats"] = list(self.sensitivity.formats)
        for key in ("prompt_len", "output_len"):
            data["serve_test"][key] = list(data["serve_test"][key])
        return data


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise InferkitError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InferkitError(f"unknown key {where}.{unknown[0]}; allowed keys: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise InferkitError(f"bad value in {where}: {exc}") from exc


def _section(data: dict, key: str, where: str) -> dict:
    value = data.pop(key, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InferkitError(f"{where}.{key} must be a mapping, got {type(value).__name__}")
    return dict(value)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise InferkitError(f"{where} must be a YAML mapping")
    data = dict(data)
    quant = _section(data, "quantize", where)
    if "ignore" in quant:
        quant["ignore"] = tuple(quant["ignore"] or ())
    if quant.get("group_size") in ("channel", 0, -1):
        quant["group_size"] = None
    calib = _section(data, "calibration", where)
    sens = _section(data, "sensitivity", where)
    if "formats" in sens:
        sens["formats"] = tuple(sens["formats"] or ())
    serve = _section(data, "serve_test", where)
    for key in ("prompt_len", "output_len"):
        if key in serve:
            serve[key] = _range(serve[key], f"{where}.serve_test.{key}")
    distill = data.pop("distill", None)
    if distill is not None:
        distill = _distill_section(distill, f"{where}.distill")
    pack = data.pop("pack", None)
    if pack is not None:
        if not isinstance(pack, dict) or set(pack) - {"archive"} or not isinstance(pack.get("archive", False), bool):
            raise InferkitError(f"{where}.pack must be a mapping with one optional key, archive (true/false)")
        pack = dict(pack)
    base = dataclasses.replace(_build(Recipe, data, where), distill=distill, pack=pack)
    return dataclasses.replace(
        base,
        quantize=_build(QuantizeConfig, quant, f"{where}.quantize"),
        calibration=_build(CalibrationConfig, calib, f"{where}.calibration"),
        sensitivity=_build(ScanConfig, sens, f"{where}.sensitivity"),
        serve_test=_build(ServeTestConfig, serve, f"{where}.serve_test"),
    )


DISTILL_EXTRA = ("student_layers", "student", "eval_prompts", "eval_data")


def _distill_section(value, where: str) -> dict:
    """Check a recipe's distill section now (bad keys and values fail at load, not mid-run)."""
    from inferkit.stages.distill import DistillConfig

    if not isinstance(value, dict):
        raise InferkitError(f"{where} must be a mapping, got {type(value).__name__}")
    allowed = {f.name for f in dataclasses.fields(DistillConfig)} | set(DISTILL_EXTRA)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InferkitError(f"unknown key {where}.{unknown[0]}; allowed keys: {', '.join(sorted(allowed))}")
    options = {k: v for k, v in value.items() if k not in DISTILL_EXTRA}
    _build(DistillConfig, options, where)
    if value.get("student") is not None and value.get("student_layers") is not None:
        raise InferkitError(f"{where}: give student or student_layers, not both")
    layers = value.get("student_layers")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise InferkitError(f"{where}.student_layers must be a positive integer, got {layers!r}")
    return dict(value)


def _range(value, where: str) -> tuple[int, int]:
    """``[lo, hi]``, ``"lo:hi"`` or one number → (lo, hi)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, str):
        parts = value.split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) in (1, 2):
            return nums[0], nums[-1]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    raise InferkitError(f"{where} must be MIN:MAX, [MIN, MAX] or one number, got {value!r}")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InferkitError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InferkitError(f"recipe {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise InferkitError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(data or {}, where=path.name)


def with_overrides(recipe: Recipe, quantize: dict | None = None, calibration: dict | None = None,
                   sensitivity: dict | None = None, serve_test: dict | None = None) -> Recipe:
    """Apply command-line flags (None values are 'not given') on top of a recipe."""
    q = {k: v for k, v in (quantize or {}).items() if v is not None}
    if q.get("group_size") == 0:  # 0 on the command line means per-channel
        q["group_size"] = None
    elif q.get("bits") == 8 and "group_size" not in q:
        q["group_size"] = None  # --bits 8 alone means the usual per-channel INT8
    c = {k: v for k, v in (calibration or {}).items() if v is not None}
    s = {k: v for k, v in (sensitivity or {}).items() if v is not None}
    t = {k: v for k, v in (serve_test or {}).items() if v is not None}
    return dataclasses.replace(
        recipe,
        quantize=dataclasses.replace(recipe.quantize, **q),
        calibration=dataclasses.replace(recipe.calibration, **c),
        sensitivity=dataclasses.replace(recipe.sensitivity, **s),
        serve_test=dataclasses.replace(recipe.serve_test, **t),
    )
