"""The runtime on a CUDA device (skipped without one): the same answers as transformers there."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def hf_greedy_cuda(folder, prompts, n, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().cuda()
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=1)
        outs.append(out[0, len(p):].tolist())
    return outs


PROMPTS = [[5, 17, 30, 2, 99], list(range(40, 75)), [300, 2, 3], [7] * 20]


@pytest.mark.parametrize("options", [dict(), dict(num_kv_blocks=6, block_size=8, max_model_len=48)], ids=["default", "preempting"])
def test_greedy_matches_transformers_on_cuda(tiny_llama, options):
    from inferkit.runtime import LLM, SamplingParams

    llm = LLM(tiny_llama, device="cuda", **options)
    prompts = [p for p in PROMPTS if len(p) + 12 <= options.get("max_model_len", 256)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy_cuda(tiny_llama, prompts, 12)
    if options:
        assert llm.engine.scheduler.num_preemptions > 0


def test_quantized_logits_match_on_cuda(tiny_llama, tmp_path):
    from inferkit.config import QuantizeConfig, Recipe
    from inferkit.data.calibration import CalibrationConfig
    from inferkit.models.artifact import load_artifact_model
    from inferkit.runtime import LLM
    from inferkit.stages.quantize import run_quantize

    out = tmp_path / "w4"
    run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=False),
                                         calibration=CalibrationConfig(source="seed", num_samples=4, seq_len=32)), out)
    ids = list(range(3, 60))
    with torch.no_grad():
        ref = load_artifact_model(out).cuda()(torch.tensor([ids], device="cuda")).logits[0].cpu()
    for backend in ("triton", "torch"):  # the Triton dequantizing matmul and the PyTorch one
        got = LLM(out, device="cuda", linear_backend=backend).score(ids)
        assert (got - ref).abs().max() < 1e-3, backend


def test_bfloat16_engine_runs(tiny_llama):
    from inferkit.runtime import LLM, SamplingParams

    llm = LLM(tiny_llama, device="cuda", dtype="bfloat16")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_and_backends_agree(tiny_llama, dtype):
    """Triton kernels with CUDA-graph decode steps, Triton without graphs, and the PyTorch
    backends: the same greedy tokens on a batch that crosses several graph sizes."""
    from inferkit.runtime import LLM, SamplingParams

    prompts = PROMPTS + [[11, 12, 13], list(range(100, 117))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    graphs = LLM(tiny_llama, device="cuda", dtype=dtype, block_size=8)
    assert graphs.engine.backends == {"linear": "triton", "attention": "triton"}
    assert graphs.engine.runner.graphs is not None
    got = [o.token_ids for o in graphs.generate(prompts, params)]
    assert graphs.engine.runner.graphs.graphs, "no decode step was replayed from a graph"
    eager = LLM(tiny_llama, device="cuda", dtype=dtype, block_size=8, cuda_graphs=False)
    torch_backends = LLM(tiny_llama, device="cuda", dtype=dtype, block_size=8, linear_backend="torch",
                         attention_backend="torch")
    assert got == [o.token_ids for o in eager.generate(prompts, params)]
    if dtype == "float32":  # in bf16 another kernel or batch size may round a near-tie the other way
        assert got == [o.token_ids for o in torch_backends.generate(prompts, params)]
        # one request at a time goes through the batch-1 graph
        assert [graphs.generate([p], params)[0].token_ids for p in prompts[:2]] == got[:2]


def test_speculative_decoding_with_graphs(tiny_llama):
    from inferkit.runtime import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = [o.token_ids for o in LLM(tiny_llama, device="cuda").generate(PROMPTS, params)]
    spec = LLM(tiny_llama, device="cuda", draft=str(tiny_llama), num_speculative_tokens=3)
    assert [o.token_ids for o in spec.generate(PROMPTS, params)] == plain
    assert spec.engine.spec_runner.stats.summary()["acceptance_rate"] == 1.0
    # the verifies (k+1 = 4 rows per sequence) replayed graphs of more rows than sequences
    assert max(spec.engine.runner.graphs.graphs) >= 4 * len(PROMPTS) > len(PROMPTS)


def test_pdl_matmuls_in_graphed_decode_steps_give_the_same_tokens(tiny_llama, tmp_path):
    """The engine's ``pdl`` option: every quantized matmul launched for PDL, each starting during
    the RMSNorm, SiLU or attention kernel before it (which signal on sm_90), gives the plain
    launches' greedy tokens and scores, with CUDA-graph decode steps."""
    from inferkit.config import QuantizeConfig, Recipe
    from inferkit.data.calibration import CalibrationConfig
    from inferkit.kernels import pdl
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.stages.quantize import run_quantize

    out = tmp_path / "w4"
    run_quantize(str(tiny_llama), Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=False),
                                         calibration=CalibrationConfig(source="seed", num_samples=4, seq_len=32)), out)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ids = list(range(3, 60))
    plain_llm = LLM(out, device="cuda", linear_backend="triton", block_size=8)
    plain = [o.token_ids for o in plain_llm.generate(PROMPTS, params)]
    plain_scores = plain_llm.score(ids)
    llm = LLM(out, device="cuda", linear_backend="triton", block_size=8, pdl=True)
    assert llm.engine.pdl is pdl.capable(torch.device("cuda"))
    assert llm.engine.runner.graphs is not None
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
    assert llm.engine.runner.graphs.graphs, "no decode step was replayed from a graph"
    assert torch.equal(llm.score(ids), plain_scores)
