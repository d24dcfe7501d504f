"""The engine loop (schedule → run → postprocess) and the stable Python API, ``LLM``."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from inferkit.errors import InferkitError
from inferkit.runtime.attention import KVCache
from inferkit.runtime.block_manager import BlockManager
from inferkit.runtime.config import EngineConfig
from inferkit.runtime.model import ModelSpec, RuntimeModel, read_formats
from inferkit.runtime.model_runner import ModelRunner
from inferkit.runtime.sampling_params import SamplingParams
from inferkit.runtime.scheduler import ScheduledSeq, Scheduler
from inferkit.runtime.sequence import Sequence
from inferkit.runtime.speculative import SpeculativeRunner, read_draft_vocab
from inferkit.runtime.weights import verify_manifest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "error"
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    arrival_time: float = 0.0
    token_times: list[float] = field(default_factory=list)  # when each token was produced


class LLMEngine:
    def __init__(self, path: str | Path, config: EngineConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(path).expanduser()
        if folder.suffix == ".gguf":
            raise InferkitError(f"{folder}: the runtime reads safetensors folders, not GGUF files; "
                                "convert it first (e.g. inferkit quantize FILE.gguf -o OUT)")
        if not (folder / "config.json").is_file():
            raise InferkitError(f"{folder} is not a model folder (no config.json)")
        if config.verify_hashes:
            verify_manifest(folder)
        if config.num_threads and torch.device(config.device).type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        try:
            hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise InferkitError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from exc
        spec = ModelSpec.from_config(hf_config)
        self.max_model_len = config.max_model_len or spec.max_position_embeddings
        if spec.sliding_window:
            self.max_model_len = min(self.max_model_len, spec.sliding_window)
        if self.max_model_len > spec.max_position_embeddings:
            raise InferkitError(f"max_model_len {self.max_model_len} exceeds the model's context of "
                                f"{spec.max_position_embeddings} tokens")
        backend, attention_backend = config.backends()
        self.backends = {"linear": backend, "attention": attention_backend}
        self.model = RuntimeModel(folder, hf_config, spec, read_formats(folder), self.dtype, self.device,
                                  backend, self.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_ids = _eos_ids(folder, hf_config, self.tokenizer)
        self.draft = self._load_draft(config, spec, backend) if config.draft else None
        self.pdl = self._launch_pdl(config, backend)
        block_bytes = KVCache.bytes_per_block(spec.num_layers, config.block_size, spec.num_kv_heads, spec.head_dim, self.dtype)
        if self.draft is not None:
            d = self.draft.spec
            block_bytes += KVCache.bytes_per_block(d.num_layers, config.block_size, d.num_kv_heads, d.head_dim, self.dtype)
        num_blocks = config.num_kv_blocks or int(config.kv_cache_gb * 2**30 // block_bytes)
        needed = -(-self.max_model_len // config.block_size)
        if num_blocks < needed:
            raise InferkitError(
                f"the KV pool of {num_blocks} blocks ({num_blocks * config.block_size} tokens, "
                f"{num_blocks * block_bytes / 2**20:.1f} MiB) cannot hold one sequence of max_model_len "
                f"{self.max_model_len} tokens ({needed} blocks); raise --kv-cache-gb or --num-kv-blocks, "
                "or lower --max-model-len")
        self.block_bytes = block_bytes
        self.cache = KVCache(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim,
                             self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        k = config.num_speculative_tokens if self.draft is not None else 0
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, k,
                                   self.max_model_len)
        # Graphs up to this many rows (captured on first use): with drafts the target verifies k+1
        # tokens per sequence and the draft catches up by one or two, each token a row
        graphs = dict(attention_backend=attention_backend, cuda_graphs=config.cuda_graphs,
                      max_model_len=self.max_model_len, max_graph_batch=min(config.max_num_seqs * (k + 1), 128))
        self.runner = ModelRunner(self.model, self.cache, **graphs)
        self.spec_runner = None
        if self.draft is not None:
            d = self.draft.spec
            draft_cache = KVCache(d.num_layers, num_blocks, config.block_size, d.num_kv_heads, d.head_dim,
                                  self.dtype, self.device)
            self.spec_runner = SpeculativeRunner(self.runner, ModelRunner(self.draft, draft_cache, **graphs))
        self.spec = spec
        self._ids = itertools.count()
        self.stats = EngineStats()

    def _launch_pdl(self, config: EngineConfig, backend: str) -> bool:
        """With the ``pdl`` option, every Triton-quantized matmul of the model and the draft is a
        programmatic dependent launch; whether the GPU runs them so (sm_90+: True; elsewhere they
        are plain launches, and the interpreter runs their loops without the waits)."""
        if not config.pdl:
            return False
        if backend != "triton":
            raise InferkitError(f"pdl: programmatic dependent launches are the Triton matmul's, and the linear "
                                f"backend is {backend}; use linear_backend=triton (the default on CUDA)")
        from inferkit.kernels import pdl
        from inferkit.runtime.linear import TritonQuantLinear

        for model in (self.model, self.draft):
            for lin in model.linears() if model is not None else []:
                if isinstance(lin, TritonQuantLinear):
                    lin.pdl = True
        return pdl.capable(self.device)

    def _load_draft(self, config: EngineConfig, spec: ModelSpec, backend: str) -> RuntimeModel:
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(config.draft).expanduser()
        if not (folder / "config.json").is_file():
            raise InferkitError(f"draft {folder} is not a model folder (no config.json)")
        if config.verify_hashes:
            verify_manifest(folder)
        draft_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        draft_spec = ModelSpec.from_config(draft_config)
        if draft_spec.vocab_size != spec.vocab_size:
            raise InferkitError(f"the draft's vocabulary has {draft_spec.vocab_size} tokens, the model's "
                                f"{spec.vocab_size}: a draft must share the model's tokenizer")
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            if AutoTokenizer.from_pretrained(folder).get_vocab() != self.tokenizer.get_vocab():
                raise InferkitError(f"the draft's tokenizer ({folder}) differs from the model's: same vocabulary "
                                    "size, other tokens")
        if draft_spec.max_position_embeddings < self.max_model_len:
            raise InferkitError(f"the draft's context ({draft_spec.max_position_embeddings}) is shorter than "
                                f"max_model_len {self.max_model_len}")
        return RuntimeModel(folder, draft_config, draft_spec, read_formats(folder), self.dtype, self.device,
                            backend, self.max_model_len, head_ids=read_draft_vocab(folder, spec.vocab_size))

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        ids = list(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.spec.vocab_size for t in ids):
            raise InferkitError(f"prompt token ids must be integers in [0, {self.spec.vocab_size})")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None) -> Sequence:
        """Queue a request; a bad one raises InferkitError and leaves the engine untouched."""
        if not isinstance(params, SamplingParams):
            raise InferkitError(f"expected SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        if not ids:
            raise InferkitError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InferkitError(f"the prompt has {len(ids)} tokens; the model's context (max_model_len) is "
                                f"{self.max_model_len}, which leaves no room to generate")
        seq = Sequence(next(self._ids), ids, params)
        seq.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One scheduling step; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:
                raise InferkitError("no request fits in the KV pool")  # guarded by the pool-size check
            return []
        blocks_used = self.block_manager.usage()[0]
        next_tokens = (self.spec_runner or self.runner).run(batch)
        now = time.perf_counter()
        for item in batch:
            if item.samples:
                item.seq.token_times.extend([now] * len(next_tokens[item.seq.seq_id]))
        finished = self.scheduler.postprocess(batch, next_tokens, self._finish_reason)
        for item in batch:  # a stop inside accepted drafts drops the tokens after it
            del item.seq.token_times[item.seq.num_output_tokens:]
            del item.seq.logprobs[item.seq.num_output_tokens:]
        self.stats.record(self, batch, blocks_used)
        return finished

    def _finish_reason(self, seq: Sequence) -> str | None:
        p = seq.params
        token = seq.token_ids[-1]
        n = seq.num_output_tokens
        if n >= p.min_tokens:
            if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
                return "stop"
            if p.stop and self._stop_string(seq):
                return "stop"
        if n >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _stop_string(self, seq: Sequence) -> bool:
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in seq.params.stop if s in text]
        if cuts:
            seq.stop_text_len = min(cuts)
            return True
        return False

    def output(self, seq: Sequence, prompt: str | None = None) -> RequestOutput:
        ids = seq.output_ids
        if ids and seq.finish_reason == "stop" and ids[-1] in self.eos_ids:
            text_ids = ids[:-1]
        else:
            text_ids = ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if seq.stop_text_len is not None:
            text = text[: seq.stop_text_len]
        return RequestOutput(seq.seq_id, prompt, seq.token_ids[: seq.num_prompt_tokens], list(ids), text,
                             seq.finish_reason, None, seq.logprobs if seq.params.logprobs is not None else None,
                             seq.num_cached_tokens, seq.num_preemptions, seq.arrival_time, list(seq.token_times))

    # -- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, V] at every position of ``token_ids`` through the paged path (prefix cache off)."""
        if self.scheduler.has_unfinished():
            raise InferkitError("score() needs an idle engine")
        ids = self.tokenize(token_ids)
        if len(ids) > self.max_model_len:
            raise InferkitError(f"{len(ids)} tokens exceed max_model_len {self.max_model_len}")
        seq = Sequence(-1, ids, SamplingParams(max_tokens=1))
        caching = self.block_manager.enable_prefix_caching
        self.block_manager.enable_prefix_caching = False
        try:
            self.block_manager.allocate(seq)
            chunks = []
            while seq.num_computed_tokens < len(seq):
                n = min(self.config.max_num_batched_tokens, len(seq) - seq.num_computed_tokens)
                chunks.append(self.runner.logits([ScheduledSeq(seq, n)]))
                seq.num_computed_tokens += n
            return torch.cat(chunks)
        finally:
            self.block_manager.free(seq)
            self.block_manager.enable_prefix_caching = caching


@dataclass
class EngineStats:
    """Counters over the engine's life: steps, tokens, KV use."""

    steps: int = 0
    peak_blocks_used: int = 0
    # Sums over steps, for time-averaged KV utilisation: tokens stored, slots of the blocks
    # in use, and slots a contiguous cache reserving max_model_len per sequence would hold.
    util_tokens: int = 0
    util_slots: int = 0
    contiguous_slots: int = 0

    def record(self, engine: LLMEngine, batch: list[ScheduledSeq], blocks_used: int) -> None:
        """``blocks_used``: after scheduling, the step's peak; utilisation is taken after
        postprocess, when the step's tokens are stored and finished sequences gone."""
        self.steps += 1
        self.peak_blocks_used = max(self.peak_blocks_used, blocks_used)
        used, stored = engine.block_manager.usage()
        self.util_tokens += stored
        self.util_slots += used * engine.block_manager.block_size
        self.contiguous_slots += len(engine.scheduler.running) * engine.max_model_len

    @property
    def kv_utilisation(self) -> float:
        return self.util_tokens / self.util_slots if self.util_slots else 0.0


def _eos_ids(folder: Path, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = folder / "generation_config.json"
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if gen.is_file():
        sources.insert(0, json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class LLM:
    """``LLM(path, **engine_options).generate(prompts, SamplingParams(...))``."""

    def __init__(self, path: str | Path, **engine_options) -> None:
        self.engine = LLMEngine(path, EngineConfig.from_options(**engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Iterable[str] | Iterable[list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. A bad request gets an output with ``error`` set and
        ``finish_reason="error"``; the others run."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InferkitError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        engine = self.engine
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        index: dict[int, int] = {}
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            try:
                seq = engine.add_request(prompt, p)
                index[seq.seq_id] = i
            except InferkitError as exc:
                ids = prompt if isinstance(prompt, list) else []
                outputs[i] = RequestOutput(-1, prompt if isinstance(prompt, str) else None, ids,
                                           finish_reason="error", error=str(exc))
        done = 0
        while engine.has_unfinished():
            for seq in engine.step():
                i = index[seq.seq_id]
                outputs[i] = engine.output(seq, prompts[i] if isinstance(prompts[i], str) else None)
                done += 1
                if progress:
                    progress(done, len(index))
        return outputs  # type: ignore[return-value]

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, V] at every position (for perplexity and comparisons)."""
        return self.engine.score(token_ids)
