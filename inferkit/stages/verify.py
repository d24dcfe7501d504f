"""``inferkit verify ARTIFACT``: is this folder exactly what was written, and will it load?

1. Files against the manifest (``inferkit.json``): every listed file present with its size and
   sha256, no file left uncovered, and the manifest's own hash (a hand edit shows).
2. Tensors against ``config.json``: the model's layers from its architecture (built on the meta
   device, no weights), each quantized linear's compressed-tensors tensors with the right names,
   dtypes and shapes for its config group, each other tensor with its model shape, and nothing
   else. Only safetensors headers are read (plus the tiny ``weight_shape`` tensors).
3. Tensor parallelism: the degrees (1, 2, 4, 8) at which vLLM could shard the model: heads
   divide (KV heads replicated when fewer than the degree), column-parallel q/k/v/gate/up split
   their outputs, row-parallel o/down their inputs into whole quantization groups and words.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from inferkit.errors import InferkitError

FLOAT_DTYPES = {"F16", "BF16", "F32"}
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass
class Report:
    folder: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files_checked: int = 0
    tensors_checked: int = 0
    tensor_parallel: dict[int, list[str]] = field(default_factory=dict)  # degree -> reasons it fails

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "files_checked": self.files_checked, "tensors_checked": self.tensors_checked,
                "tensor_parallel": {str(k): {"ok": not v, "reasons": v} for k, v in self.tensor_parallel.items()}}


def check_files(folder: Path, report: Report) -> None:
    from inferkit.artifacts import MANIFEST, manifest_digest, sha256_file

    path = folder / MANIFEST
    if not path.is_file():
        report.errors.append(f"no {MANIFEST}: nothing to check the files against")
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.errors.append(f"{MANIFEST} is not valid JSON ({exc})")
        return
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        report.errors.append(f"{MANIFEST} has no 'files' table")
        return
    if "manifest_sha256" not in manifest:
        report.errors.append(f"{MANIFEST} carries no hash of itself: it was edited, or written by an older "
                             "inferkit (re-pack it)")
    elif manifest["manifest_sha256"] != manifest_digest(manifest):
        report.errors.append(f"{MANIFEST} was edited after it was written (its own hash does not match)")
    for rel, entry in sorted(files.items()):
        f = folder / rel
        if not isinstance(entry, dict) or "sha256" not in entry:
            report.errors.append(f"{MANIFEST}: entry for {rel} has no sha256")
            continue
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            report.errors.append(f"{MANIFEST}: {rel} points outside the artifact")
            continue
        if not f.is_file():
            report.errors.append(f"{rel}: listed in the manifest but missing")
            continue
        report.files_checked += 1
        if "bytes" in entry and f.stat().st_size != entry["bytes"]:
            report.errors.append(f"{rel}: {f.stat().st_size} bytes, the manifest says {entry['bytes']}")
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            report.errors.append(f"{rel}: sha256 {digest[:12]}… does not match the manifest's {str(entry['sha256'])[:12]}…")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for rel in sorted(present - set(files) - {MANIFEST}):
        report.errors.append(f"{rel}: not covered by the manifest")


def _matches(pattern: str, name: str) -> bool:
    if pattern == "Linear":
        return True
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or name.endswith("." + pattern)


def read_headers(folder: Path) -> dict[str, tuple[str, list[int], object]]:
    """``{tensor name: (dtype, shape, file handle)}`` from every model*.safetensors header."""
    from safetensors import safe_open

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise InferkitError(f"{folder} has no model*.safetensors")
    out = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                sl = handle.get_slice(key)
                if key in out:
                    raise InferkitError(f"tensor {key} is stored twice")
                out[key] = (sl.get_dtype(), list(sl.get_shape()), handle)
        except InferkitError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise InferkitError(f"{f.name} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    return out


def model_skeleton(folder: Path):
    """The model's modules on the meta device (no memory, no weights): names, linears, shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise InferkitError(f"config.json cannot be read: {str(exc).splitlines()[0]}") from None
    raw = json.loads((folder / "config.json").read_text())
    raw_q = raw.get("quantization_config")
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # build the plain architecture; the check reads the raw block
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model, raw_q


def check_tensors(folder: Path, report: Report) -> tuple[object, dict]:
    """Returns the HF config and ``{linear name: (out, in, format or None)}`` for the TP check."""
    import torch

    from inferkit.quant.pack import packed_width
    from inferkit.quant.scheme import QuantFormat

    try:
        headers = read_headers(folder)
        config, model, qconfig = model_skeleton(folder)
    except InferkitError as exc:
        report.errors.append(str(exc))
        return None, {}
    groups = []
    if qconfig:
        if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != "pack-quantized":
            report.errors.append(f"quantization_config is {qconfig.get('quant_method')}/{qconfig.get('format')}; "
                                 "inferkit writes and checks compressed-tensors pack-quantized")
            return config, {}
        try:
            for name, group in sorted((qconfig.get("config_groups") or {}).items()):
                w = group["weights"]
                fmt = QuantFormat(int(w["num_bits"]), w.get("group_size") if w.get("strategy") == "group" else None,
                                  bool(w["symmetric"]))
                groups.append((name, fmt, list(group["targets"])))
        except (KeyError, TypeError, ValueError, InferkitError) as exc:
            report.errors.append(f"quantization_config: a config group is malformed ({exc})")
            return config, {}
    ignore = list((qconfig or {}).get("ignore") or [])
    expected: dict[str, tuple[str, list[int] | None]] = {}  # name -> (dtype class, shape)
    linears = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        out_f, in_f = module.out_features, module.in_features
        fmt = None
        if not any(_matches(p, name) for p in ignore):
            fmt = next((f for _, f, targets in groups if any(_matches(t, name) for t in targets)), None)
        quantized = f"{name}.weight_packed" in headers
        if fmt is not None and not quantized and f"{name}.weight" in headers:
            report.errors.append(f"{name}: the config quantizes it ({fmt.name}) but the checkpoint holds a float weight")
            fmt = None
        if fmt is None and quantized:
            report.errors.append(f"{name}: packed tensors present but no config group targets it (or it is ignored)")
        linears[name] = (out_f, in_f, fmt)
        if module.bias is not None:
            expected[f"{name}.bias"] = ("float", [out_f])
        if fmt is None:
            if name == "lm_head" and tied and "lm_head.weight" not in headers:
                continue
            expected[f"{name}.weight"] = ("float", [out_f, in_f])
            continue
        groups_n = fmt.num_groups(in_f)
        expected[f"{name}.weight_packed"] = ("I32", [out_f, packed_width(in_f, fmt.bits)])
        expected[f"{name}.weight_scale"] = ("float", [out_f, groups_n])
        expected[f"{name}.weight_shape"] = ("int", [2])
        if not fmt.symmetric:
            expected[f"{name}.weight_zero_point"] = ("I32", [packed_width(out_f, fmt.bits), groups_n])
    linear_names = set(linears)
    for key, param in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in linear_names:
            continue
        expected[key] = ("float", list(param.shape))
    for key, (kind, shape) in sorted(expected.items()):
        if key not in headers:
            report.errors.append(f"tensor {key} is missing")
            continue
        dtype, got_shape, handle = headers[key]
        report.tensors_checked += 1
        ok_dtype = (dtype in FLOAT_DTYPES if kind == "float" else dtype in ("I64", "I32") if kind == "int" else dtype == kind)
        if not ok_dtype:
            report.errors.append(f"tensor {key}: dtype {dtype}, expected {kind if kind != 'float' else 'a float type'}")
        if got_shape != shape:
            report.errors.append(f"tensor {key}: shape {got_shape}, expected {shape}")
        if key.endswith(".weight_shape") and ok_dtype and got_shape == [2]:
            owner = key[: -len(".weight_shape")]
            value = handle.get_tensor(key).tolist()
            if value != [linears[owner][0], linears[owner][1]]:
                report.errors.append(f"tensor {key}: {value}, the layer is {[linears[owner][0], linears[owner][1]]}")
    for key in sorted(set(headers) - set(expected)):
        report.errors.append(f"tensor {key} is not part of the model")
    return config, linears


def tensor_parallel(config, linears: dict, degrees=(1, 2, 4, 8)) -> dict[int, list[str]]:
    """Why each degree cannot shard the model the way vLLM shards Llama-style layers (empty: it can)."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = {}
    for tp in degrees:
        reasons = []
        if heads % tp:
            reasons.append(f"{heads} attention heads do not divide by {tp}")
        if (kv_heads % tp) if tp <= kv_heads else (tp % kv_heads):
            reasons.append(f"{kv_heads} KV heads neither divide by {tp} nor replicate evenly")
        for name, (out_f, in_f, fmt) in sorted(linears.items()):
            kind = name.rpartition(".")[2]
            if kind in COLUMN_PARALLEL:
                if kind in ("k_proj", "v_proj") and tp > kv_heads:
                    continue  # replicated, not split
                if out_f % tp:
                    reasons.append(f"{name}: {out_f} outputs do not split {tp} ways")
                elif fmt is not None and not fmt.symmetric and (out_f // tp) % (32 // fmt.bits):
                    reasons.append(f"{name}: zero points packed along {out_f // tp} outputs per shard cut a word")
            elif kind in ROW_PARALLEL:
                shard = in_f // tp
                if in_f % tp:
                    reasons.append(f"{name}: {in_f} inputs do not split {tp} ways")
                elif fmt is not None and fmt.group_size and shard % fmt.group_size:
                    reasons.append(f"{name}: {shard} inputs per shard are not whole groups of {fmt.group_size}")
                elif fmt is not None and shard % (32 // fmt.bits):
                    reasons.append(f"{name}: {shard} inputs per shard cut a packed int32 word")
        # one reason per layer kind is enough to read
        seen, short = set(), []
        for r in reasons:
            key = re.sub(r"layers\.\d+\.", "layers.*.", r)
            if key not in seen:
                seen.add(key)
                short.append(key)
        out[tp] = short
    return out


def verify_artifact(folder: Path) -> Report:
    folder = Path(folder)
    if not folder.is_dir():
        raise InferkitError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise InferkitError(f"{folder} is not a model folder (no config.json)")
    report = Report(str(folder))
    check_files(folder, report)
    try:
        config, linears = check_tensors(folder, report)
    except Exception as exc:  # noqa: BLE001  (a config transformers cannot build, a malformed block...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        report.errors.append(f"the tensors could not be checked against config.json: {type(exc).__name__}: {first}")
        config, linears = None, {}
    if config is not None and linears:
        report.tensor_parallel = tensor_parallel(config, linears)
    return report
