"""The runtime against transformers on tiny random models: greedy tokens, logits of quantized
artifacts, prefix caching, preemption, sampling, stop conditions and bad input."""

import json

import pytest
import torch

from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.models.artifact import load_artifact_model
from inferkit.runtime import LLM, SamplingParams
from inferkit.runtime.sampler import filtered_probs
from inferkit.stages.quantize import run_quantize

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 17, 30, 2, 99], [7] * 3, list(range(40, 75)), [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210],
           [5, 17, 30, 2, 99, 11], [300, 2, 3]]


def hf_greedy(folder, prompts, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=1)
        outs.append(out[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def hf_reference(tiny_llama):
    return hf_greedy(tiny_llama, PROMPTS, 24)


@pytest.mark.parametrize("options", [
    dict(), dict(enable_prefix_caching=False), dict(max_num_batched_tokens=7),
    dict(num_kv_blocks=7, block_size=8, max_model_len=56),  # 56 slots for six sequences of up to 59: preemptions
], ids=["default", "no-prefix-cache", "chunked", "preempting"])
def test_greedy_matches_transformers(tiny_llama, hf_reference, options):
    llm = LLM(tiny_llama, **options)
    prompts = PROMPTS if "max_model_len" not in options else [p for p in PROMPTS if len(p) + 24 <= 56]
    expected = [r for p, r in zip(PROMPTS, hf_reference) if p in prompts]
    batched = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in batched] == expected
    one_by_one = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert one_by_one == expected
    if "num_kv_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_match_transformers(tiny_models, arch):
    llm = LLM(tiny_models[arch])
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == hf_greedy(tiny_models[arch], PROMPTS[:3], 24)


def test_prefix_cache_serves_a_repeated_prompt(tiny_llama):
    llm = LLM(tiny_llama, block_size=4)
    prompt = list(range(10, 40))
    first = llm.generate([prompt], GREEDY)[0]
    again = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 28
    assert again.token_ids == first.token_ids


def test_score_matches_transformers_logits(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = list(range(3, 100))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    llm = LLM(tiny_llama, max_num_batched_tokens=32)  # scored in chunks through the paged cache
    assert torch.allclose(llm.score(ids), ref, atol=1e-4)


CALIB = CalibrationConfig(source="seed", num_samples=8, seq_len=64)


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    out = {}
    for name, q in {"w4-asym-g32": dict(method="gptq", bits=4, group_size=32, symmetric=False),
                    "w8-ch": dict(method="rtn", bits=8, group_size=None),
                    "w4-sym-g64": dict(method="rtn", bits=4, group_size=64, overrides={"mlp.down_proj": "int4-ch-sym"}),
                    "mixed": dict(method="rtn", bits=4, group_size=32, overrides={"mlp.down_proj": "int8-ch-sym", "k_proj": "skip"}),
                    }.items():
        path = tmp_path_factory.mktemp("art") / name
        run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(batch_size=4, **q), calibration=CALIB), path)
        out[name] = path
    return out


@pytest.mark.parametrize("name", ["w4-asym-g32", "w8-ch", "w4-sym-g64", "mixed"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_quantized_artifact_logits_match_transformers(artifacts, name, backend):
    ids = list(range(3, 60))
    with torch.no_grad():
        ref = load_artifact_model(artifacts[name])(torch.tensor([ids])).logits[0]
    got = LLM(artifacts[name], linear_backend=backend).score(ids)
    assert (got - ref).abs().max() < 1e-4


def test_quantized_weights_stay_packed(artifacts):
    for backend, attr in (("torch", "packed"), ("packed", "weight")):
        llm = LLM(artifacts["w4-asym-g32"], linear_backend=backend)
        gate_up = llm.engine.model.layers[0].gate_up
        assert getattr(gate_up, attr).dtype == torch.uint8
        assert getattr(gate_up, attr).numel() == gate_up.out_features * gate_up.in_features // 2
    down = LLM(artifacts["w8-ch"]).engine.model.layers[0].down
    assert down.weight.dtype == torch.int8 and down.weight.shape == (64, 96)


def _linears(llm):
    for layer in llm.engine.model.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            yield from getattr(lin, "parts", [lin])


@pytest.mark.parametrize("name", ["w4-asym-g32", "w8-ch", "w4-sym-g64", "mixed"])
def test_packed_cpu_kernels_are_the_cpu_default_and_close_to_exact(artifacts, name):
    """On the CPU, INT4 (groups, asymmetric, per channel as groups of 32) and INT8 per channel run
    through PyTorch's packed kernels with bfloat16 products: logits within bfloat16 rounding of
    the exact path (measured 0.018-0.022 on logits of magnitude ~2.6 on these models)."""
    ids = list(range(3, 60))
    exact = LLM(artifacts[name], linear_backend="torch")
    packed = LLM(artifacts[name])
    assert packed.engine.backends == {"linear": "packed", "attention": "torch"}
    kinds = {type(lin).__name__ for lin in _linears(packed)}
    assert kinds == ({"PackedCPULinear", "DenseLinear"} if name == "mixed" else {"PackedCPULinear"})  # k_proj kept dense
    a, b = exact.score(ids), packed.score(ids)
    assert (a - b).abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


def test_packed_kernel_limits_fall_back_to_the_exact_path(artifacts, monkeypatch):
    """Shapes the kernels cannot take are refused up front, and a layer whose packed output does
    not match the exact product when it is built (the INT8 kernel gives wrong sums, or crashes, for
    inputs not in multiples of 16) is served by the exact path."""
    from inferkit.quant.scheme import QuantFormat
    from inferkit.runtime.linear import PackedCPULinear, QuantLinear

    assert PackedCPULinear.supports(QuantFormat(4, 32, False), 64, 96, True)
    assert PackedCPULinear.supports(QuantFormat(4, None), 64, 96, False)  # per channel: 3 groups of 32
    assert not PackedCPULinear.supports(QuantFormat(4, 32), 40, 64, False)  # outputs not a multiple of 16
    assert not PackedCPULinear.supports(QuantFormat(4, None), 64, 80, False)  # no group of 32-256 fits
    assert not PackedCPULinear.supports(QuantFormat(8, None), 64, 104, False)  # INT8 inputs in multiples of 32
    assert not PackedCPULinear.supports(QuantFormat(8, None, False), 64, 96, True)  # INT8 zero points
    assert not PackedCPULinear.supports(QuantFormat(8, 32), 64, 96, False)  # INT8 groups
    exact = LLM(artifacts["w4-asym-g32"], linear_backend="torch").score(list(range(3, 40)))
    monkeypatch.setattr(PackedCPULinear, "__call__", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    llm = LLM(artifacts["w4-asym-g32"])
    assert {type(lin) for lin in _linears(llm)} == {QuantLinear}
    assert torch.equal(llm.score(list(range(3, 40))), exact)


def test_kv_store_skips_padding_rows_and_keeps_the_zero_block_zero():
    """The PyTorch K/V write as a CUDA graph's padding rows (slot -1) reach it: the real rows land in
    their slots, the padding rows change nothing (no out-of-bounds index, the zero block stays zero)."""
    from inferkit.runtime.attention import KVCache

    cache = KVCache(2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    cache.k.zero_()
    cache.v.zero_()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(4, 2, 8, generator=g) + 5, torch.randn(4, 2, 8, generator=g) - 5
    slots = torch.tensor([7, -1, 0, -1])
    cache.store(1, k, v, slots, padded=True)
    flat_k, flat_v = cache.k[1].view(-1, 2, 8), cache.v[1].view(-1, 2, 8)
    assert torch.equal(flat_k[7], k[0]) and torch.equal(flat_k[0], k[2])
    assert torch.equal(flat_v[7], v[0]) and torch.equal(flat_v[0], v[2])
    written = flat_k.abs().sum((1, 2)) > 0
    assert written.nonzero().flatten().tolist() == [0, 7]  # the zero block (slots 12-15) too stays zero
    assert not cache.k[0].any() and not cache.v[0].any()


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_llama):
    llm = LLM(tiny_llama)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].token_ids
    batched = llm.generate(PROMPTS[:4], [SamplingParams(temperature=1.0, max_tokens=16, seed=i) for i in range(3)] + [params])
    in_batch = llm.generate([PROMPTS[1], PROMPTS[0]], [GREEDY, params])[1].token_ids
    assert alone == in_batch and len(batched) == 4
    other = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=16, seed=8, ignore_eos=True))
    assert other[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_llama):
    llm = LLM(tiny_llama)
    greedy = [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)]
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=24, ignore_eos=True, seed=1),
                   SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=24, ignore_eos=True, seed=1)):
        assert [o.token_ids for o in llm.generate(PROMPTS[:3], params)] == greedy


def test_filtered_probs_cut_exactly():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.allclose(filtered_probs(logits, 1.0, 2, 1.0), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    assert torch.allclose(filtered_probs(logits, 1.0, 0, 0.7), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))  # 0.5 < 0.7
    assert torch.allclose(filtered_probs(logits, 1.0, 0, 0.71), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    hot = filtered_probs(logits, 2.0, 0, 1.0)
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))


def test_logprobs_are_the_models(tiny_llama):
    llm = LLM(tiny_llama)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))[0]
    logits = llm.score(PROMPTS[0] + out.token_ids)
    logp = torch.log_softmax(logits[len(PROMPTS[0]) - 1:-1], -1)
    for i, entry in enumerate(out.logprobs):
        token = out.token_ids[i]
        assert entry[token] == pytest.approx(float(logp[i, token]), abs=1e-4)
        assert set(entry) == {token} | set(torch.topk(logp[i], 2).indices.tolist())


def test_stop_conditions(tiny_llama):
    llm = LLM(tiny_llama)
    free = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    stop_id = free.token_ids[5]
    by_id = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]))[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1] and by_id.finish_reason == "stop"
    stop_text = free.text[10:13]
    by_text = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=24, stop=[stop_text]))[0]
    assert by_text.finish_reason == "stop" and stop_text not in by_text.text and free.text.startswith(by_text.text)
    assert by_text.text == free.text[: free.text.index(stop_text)]
    assert free.finish_reason == "length" and len(free.token_ids) == 24


def test_eos_ends_a_request_unless_ignored(tiny_llama):
    llm = LLM(tiny_llama)
    free = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    llm.engine.eos_ids = {free.token_ids[3]}
    stopped = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24))[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]
    assert stopped.finish_reason == "stop"
    at_least = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24, min_tokens=10))[0]
    assert len(at_least.token_ids) >= 10


def test_string_prompts_are_tokenized(tiny_llama):
    llm = LLM(tiny_llama)
    text = "def add(a, b):"
    ids = llm.tokenizer(text)["input_ids"]
    assert llm.generate(text, GREEDY)[0].token_ids == llm.generate([ids], GREEDY)[0].token_ids


def test_bad_request_fails_alone(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=64)
    outs = llm.generate([PROMPTS[0], list(range(70)), [], PROMPTS[1]], GREEDY)
    assert outs[1].finish_reason == "error" and "max_model_len" in outs[1].error
    assert outs[2].finish_reason == "error" and "empty" in outs[2].error
    assert outs[0].token_ids and outs[3].token_ids and outs[0].error is None
    bad_ids = llm.generate([[5, 10_000]], GREEDY)[0]
    assert "token ids" in bad_ids.error


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=-1), "logprobs"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(InferkitError, match=message):
        SamplingParams(**kwargs)


def test_engine_option_errors(tiny_llama):
    with pytest.raises(InferkitError, match="cannot hold one sequence"):
        LLM(tiny_llama, num_kv_blocks=3, block_size=16)  # 48 slots < 256-token context
    with pytest.raises(InferkitError, match="unknown engine option"):
        LLM(tiny_llama, kv_cache_size=3)
    with pytest.raises(InferkitError, match="block_size"):
        LLM(tiny_llama, block_size=12)
    with pytest.raises(InferkitError, match="exceeds the model's context"):
        LLM(tiny_llama, max_model_len=100_000)


def test_tampered_artifact_is_refused(artifacts, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifacts["w8-ch"], art)
    cfg = json.loads((art / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (art / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InferkitError, match="config.json does not match its manifest hash"):
        LLM(art)
    LLM(art, verify_hashes=False)  # the user can opt out


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
], ids=["llama3", "linear", "yarn"])
def test_rope_scaling_matches_transformers(tiny_model_factory, rope):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_factory("m", rope_scaling=rope)
    ids = list(range(3, 200))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    assert torch.allclose(LLM(folder).score(ids), ref, atol=1e-4)


def test_graph_decode_staging_fills_what_the_kernels_read():
    """The host buffers behind a graphed decode step: each row's token, position, cache slot,
    length and the blocks up to its last; padding rows write nowhere and read the zero block.
    Entries past a row's last block may be stale from an earlier step (never read)."""
    from types import SimpleNamespace

    from inferkit.runtime.model_runner import Chunk, DecodeStaging

    staging = DecodeStaging(max_batch=8, width=6, zero_block=99)
    seqs = [SimpleNamespace(token_ids=list(range(100, 130)), block_table=[7, 3, 11, 5, 2]),
            SimpleNamespace(token_ids=list(range(200, 210)), block_table=[4, 8, 6]),
            SimpleNamespace(token_ids=[42], block_table=[1])]
    for step, starts in enumerate(([17, 9, 0], [3, 0])):  # the second step: fewer, shorter rows
        chunks = [Chunk(seq, p, 1, "last") for seq, p in zip(seqs, starts)]
        vec, lens, tables = staging.fill(chunks, 4, block_size=4)
        for i, (seq, p) in enumerate(zip(seqs, starts)):
            used = p // 4 + 1
            assert vec[:, i].tolist() == [seq.token_ids[p], p, seq.block_table[p // 4] * 4 + p % 4]
            assert int(lens[i]) == p + 1 and tables[i, :used].tolist() == seq.block_table[:used]
        for pad in range(len(starts), 4):
            assert vec[:, pad].tolist() == [0, 0, -1] and int(lens[pad]) == 1 and int(tables[pad, 0]) == 99
    assert vec[:, 0].tolist() == [103, 3, 31] and tables[0, :1].tolist() == [7]


@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
def test_prepare_lays_out_a_mixed_step(triton):
    """A step with a decode, a speculative verify (3 tokens mid-sequence), a prefill from 0 and a
    chunk starting mid-block: every row's token, position and slot, which rows attend as decodes
    (with their tables and lengths), the prefill chunks and the sampled rows."""
    from types import SimpleNamespace

    from inferkit.runtime.model_runner import Chunk, ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.device, runner.triton = 4, torch.device("cpu"), triton
    runner.cache = SimpleNamespace(zero_slot=400, block_size=4)
    a = SimpleNamespace(token_ids=list(range(100, 120)), block_table=[7, 3, 11, 5, 2])
    b = SimpleNamespace(token_ids=list(range(200, 211)), block_table=[4, 8, 6])
    c = SimpleNamespace(token_ids=list(range(300, 312)), block_table=[9, 1, 12])
    d = SimpleNamespace(token_ids=list(range(400, 430)), block_table=[20, 21, 22, 23, 24, 25, 26, 27])
    chunks = [Chunk(a, 17, 1), Chunk(b, 8, 3, "all"), Chunk(c, 0, 12, "none"), Chunk(d, 6, 13)]
    ids, positions, meta, rows = runner.prepare(chunks)
    want = [(s, p) for ch, s in zip(chunks, (a, b, c, d)) for p in range(ch.start, ch.start + ch.num_tokens)]
    assert ids.tolist() == [s.token_ids[p] for s, p in want]
    assert positions.tolist() == [p for _, p in want]
    assert meta.slot_mapping.tolist() == [s.block_table[p // 4] * 4 + p % 4 for s, p in want]
    assert rows == [0, 1, 2, 3, 28]  # a's last, all of b's, none of c's, d's last
    assert meta.decode_rows.tolist() == [0, 1, 2, 3] and not meta.all_decode
    lens = [18, 9, 10, 11]
    tables = [a.block_table[:5], b.block_table[:3], b.block_table[:3], b.block_table[:3]]
    if triton:
        assert meta.decode_lens.tolist() == lens and meta.max_decode_len == 18
        assert meta.decode_tables.tolist() == [t + [0] * (5 - len(t)) for t in tables]
        assert meta.prefill_info.tolist() == [[4, 0, 12], [16, 6, 13]] and meta.max_prefill_len == 13
        assert meta.prefill_tables.tolist() == [c.block_table + [0] * 2, d.block_table[:5]]
    else:
        assert meta.decode_slots.tolist()[0][:18] == [a.block_table[p // 4] * 4 + p % 4 for p in range(18)]
        assert meta.decode_mask[:, 0, 0].sum(1).tolist() == lens
        assert [(ch.row, ch.start, ch.num_tokens, ch.block_table.tolist()) for ch in meta.prefills] == [
            (4, 0, 12, c.block_table), (16, 6, 13, d.block_table[:5])]


def test_graphed_steps_lay_out_short_chunks_as_prepare_does():
    """Decode graphs also take speculative verifies (k+1 tokens mid-sequence) and a draft's
    catch-up chunks: each token becomes a row with the same token, position, slot, length and
    block table as the eager path's decode rows, and the same rows' logits come back."""
    from types import SimpleNamespace

    from inferkit.runtime.model_runner import Chunk, DecodeGraphs, ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.device, runner.triton = 4, torch.device("cpu"), True
    runner.cache = SimpleNamespace(zero_slot=400, block_size=4)
    graphs = DecodeGraphs(runner, max_model_len=32, max_batch=16)
    a = SimpleNamespace(token_ids=list(range(100, 120)), block_table=[7, 3, 11, 5, 2])
    b = SimpleNamespace(token_ids=list(range(200, 211)), block_table=[4, 8, 6])
    c = SimpleNamespace(token_ids=list(range(300, 306)), block_table=[9, 1])
    steps = [
        [Chunk(a, 15, 4, "all"), Chunk(b, 7, 4, "all"), Chunk(c, 5, 1)],  # verifies of 3 drafts + a decode
        [Chunk(a, 17, 2, "last"), Chunk(b, 9, 1, "none"), Chunk(c, 5, 1)],  # draft catch-up
        [Chunk(a, 17, 1), Chunk(c, 5, 1)],  # plain decodes: every row comes back
    ]
    for chunks in steps:
        assert graphs.fits(chunks)
        ids, positions, meta, rows = runner.prepare(chunks)
        n = len(ids)
        vec, lens, tables = graphs.staging.fill(chunks, 16, block_size=4)
        assert vec[0, :n].tolist() == ids.tolist() and vec[1, :n].tolist() == positions.tolist()
        assert vec[2, :n].tolist() == meta.slot_mapping.tolist()
        assert meta.all_decode and lens[:n].tolist() == meta.decode_lens.tolist()
        for i, width in enumerate(lens[:n].tolist()):
            used = -(-width // 4)
            assert tables[i, :used].tolist() == meta.decode_tables[i, :used].tolist()
        assert vec[2, n:].tolist() == [-1] * (16 - n)  # padding rows write nowhere
        keep = graphs.kept_rows(chunks)
        assert (list(range(n)) if keep is None else keep) == rows
    assert graphs.kept_rows(steps[2]) is None and graphs.kept_rows(steps[1]) == [1, 3]
    # not decode-shaped, or too many rows: the eager path
    assert not graphs.fits([Chunk(a, 0, 5)])  # a prefill from the start
    assert not graphs.fits([Chunk(a, 4, 9)])  # longer than a short chunk
    assert not graphs.fits([Chunk(a, 10, 8), Chunk(b, 2, 8), Chunk(c, 5, 1)])  # 17 rows > 16
