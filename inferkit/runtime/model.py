"""The Llama-family forward pass (Llama, Mistral, Qwen2): RMSNorm, RoPE with the config's
scaling, grouped-query attention over the paged cache, SwiGLU; one flat batch of tokens from
many sequences per call."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from inferkit.errors import InferkitError
from inferkit.runtime.attention import AttentionMetadata, KVCache, paged_attention
from inferkit.runtime.linear import DenseLinear
from inferkit.runtime.weights import Checkpoint, LinearLoader

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        if cfg.model_type not in SUPPORTED:
            raise InferkitError(f"the runtime runs {', '.join(SUPPORTED)} models, not {cfg.model_type!r}")
        heads = cfg.num_attention_heads
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        return cls(cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.rms_norm_eps,
                   cfg.max_position_embeddings, bool(getattr(cfg, "tie_word_embeddings", False)), window)


def rope_tables(cfg, max_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, head_dim] as transformers computes them (float32), scaling included."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = 1.0
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    elif rope_type == "dynamic":
        raise InferkitError("dynamic NTK RoPE scaling is not supported by the runtime")
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise InferkitError(f"unknown RoPE scaling type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, weight.shape, weight, eps)  # same arithmetic, one kernel
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, update: torch.Tensor | None = None) -> torch.Tensor:
    """``h += update`` in place (none before the first layer), then RMSNorm(h): the PyTorch
    counterpart of ``inferkit.kernels.fused.rms_norm``."""
    if update is not None:
        h.add_(update)
    return rms_norm(h, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos, sin_signed [T, 1, D] (sin with its first half negated).

    transformers' ``x * cos + rotate_half(x) * sin``, where rotate_half(x) = [-x2, x1]:
    swapping the halves and folding the sign into sin gives the same products.
    """
    half = x.shape[-1] // 2
    swapped = x.view(*x.shape[:-1], 2, half).flip(-2).view(x.shape)
    return x * cos + swapped * sin_signed


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: object
    o: object
    post_norm: torch.Tensor
    gate_up: object
    down: object


class RuntimeModel:
    # With the Triton attention backend, the element-wise steps run as Triton kernels too
    # (benchmarks/launches.py turns this off to count what the fusion saves)
    fuse_elementwise = True

    def __init__(self, folder: Path, hf_config, spec: ModelSpec, formats: dict, dtype: torch.dtype,
                 device: torch.device, backend: str, max_len: int, head_ids: torch.Tensor | None = None) -> None:
        """``head_ids``: a draft's reduced vocabulary (target token ids, ascending); the output
        head keeps only those rows and logits come out over them, the embeddings stay whole."""
        self.spec, self.dtype, self.device = spec, dtype, device
        ckpt = Checkpoint(folder)
        lin = LinearLoader(ckpt, formats, dtype, device, backend)

        def tensor(name: str) -> torch.Tensor:
            return ckpt.get(name).to(device, dtype)

        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}"
            attn, mlp = f"{p}.self_attn", f"{p}.mlp"
            self.layers.append(Layer(
                tensor(f"{p}.input_layernorm.weight"),
                lin.load([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]),
                lin.load([f"{attn}.o_proj"]),
                tensor(f"{p}.post_attention_layernorm.weight"),
                lin.load([f"{mlp}.gate_proj", f"{mlp}.up_proj"]),
                lin.load([f"{mlp}.down_proj"]),
            ))
        self.norm = tensor("model.norm.weight")
        if "lm_head.weight" in ckpt or lin.is_packed("lm_head"):
            self.lm_head = lin.load(["lm_head"])
            self.embed = tensor("model.embed_tokens.weight")  # [V, H]
        elif spec.tie_word_embeddings:
            self.lm_head = lin.load(["model.embed_tokens"])  # one tensor serves both
            self.embed = None
        else:
            raise InferkitError("the checkpoint has no lm_head.weight and the config does not tie embeddings")
        self.head_ids = None
        if head_ids is not None:
            if not isinstance(self.lm_head, DenseLinear):
                raise InferkitError("a reduced draft vocabulary needs an unquantized output head")
            if self.embed is None:
                self.embed = self.lm_head.weight
            self.head_ids = head_ids.to(device)
            self.lm_head = DenseLinear(self.lm_head.weight[self.head_ids])
        cos, sin = rope_tables(hf_config, max_len, spec.head_dim)
        half = spec.head_dim // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.cos2, self.sin2 = cos.to(device, dtype), sin.to(device, dtype)  # [max_len, D]: the fused RoPE's
        self.cos, self.sin = self.cos2[:, None, :], self.sin2[:, None, :]  # [max_len, 1, D]: broadcast over heads
        self.scale = spec.head_dim ** -0.5
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim

    def linears(self) -> list:
        """Every linear layer (the parts of concatenated ones), in layer order, the output head last."""
        out = []
        for layer in self.layers:
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                out.extend(getattr(lin, "parts", [lin]))
        return out + getattr(self.lm_head, "parts", [self.lm_head])

    def nbytes(self) -> int:
        """Bytes of weights held (packed where quantized)."""
        total = sum(lin.nbytes() for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        total += sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.input_norm, layer.post_norm))
        total += self.lm_head.nbytes() + self.norm.numel() * self.norm.element_size()
        return total + (self.embed.numel() * self.embed.element_size() if self.embed is not None else 0)

    @property
    def num_logits(self) -> int:
        return self.lm_head.out_features

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            return self.embed[ids]
        return self.lm_head.weight[ids]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """Logits [len(logit_rows), V] (float32) for the chosen rows (None: every row)."""
        if self.device.type != "cuda":
            return self._forward(input_ids, positions, meta, cache, logit_rows)
        # cuDNN's attention builds a graph per new shape, and decode changes the key length
        # every step: measured 4x slower in bf16 on an H100. The other backends do not.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return self._forward(input_ids, positions, meta, cache, logit_rows)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 cache: KVCache, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """With the Triton attention backend the element-wise steps are Triton kernels too
        (``inferkit.kernels.fused``): each residual add rides with the RMSNorm after it, RoPE with
        the KV-cache write, SiLU with the product; the same arithmetic in a third of the launches."""
        s = self.spec
        fused = meta.triton and self.fuse_elementwise
        if fused:
            from inferkit.kernels import fused as fk

            add_norm = fk.rms_norm  # (h, weight, eps, update)
        else:
            cos, sin = self.cos[positions], self.sin[positions]
            add_norm = add_rms_norm
        h = self.embed_tokens(input_ids)  # a fresh tensor: the residual stream, updated in place
        update = None  # the last MLP's output, added to h by the next norm
        for i, layer in enumerate(self.layers):
            x = add_norm(h, layer.input_norm, s.rms_norm_eps, update)
            qkv = layer.qkv(x)
            if fused:
                q = fk.rope_store(qkv, self.cos2, self.sin2, positions, s.num_heads, s.num_kv_heads, cache.k[i],
                                  cache.v[i], meta.slot_mapping)
            else:
                qkv = qkv.view(-1, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
                qk = apply_rope(qkv[:, : s.num_heads + s.num_kv_heads], cos, sin)  # q and k heads at once
                q, k = qk[:, : s.num_heads], qk[:, s.num_heads:]
                cache.store(i, k, qkv[:, s.num_heads + s.num_kv_heads:], meta.slot_mapping, padded=meta.triton)
            o = paged_attention(q, cache, i, meta, self.scale)
            x = add_norm(h, layer.post_norm, s.rms_norm_eps, layer.o(o.reshape(-1, self.q_size)))
            gate_up = layer.gate_up(x)
            if fused:
                update = layer.down(fk.silu_mul(gate_up))
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                update = layer.down(F.silu(gate) * up)
        x = add_norm(h, self.norm, s.rms_norm_eps, update)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(x).float()


def read_formats(folder: Path) -> dict:
    """Format of every packed layer named by the artifact's quantization_config ({} if none)."""
    from inferkit.models.artifact import _layer_formats

    raw = json.loads((folder / "config.json").read_text())
    qconfig = raw.get("quantization_config") or {}
    if not qconfig:
        return {}
    if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != "pack-quantized":
        raise InferkitError(f"the runtime reads compressed-tensors pack-quantized artifacts, not "
                            f"{qconfig.get('quant_method')}/{qconfig.get('format')}")
    from safetensors import safe_open

    names = []
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            names += [k[: -len(".weight_packed")] for k in handle.keys() if k.endswith(".weight_packed")]
    return _layer_formats(qconfig, names)
