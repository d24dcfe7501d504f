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
    got = LLM(out, device="cuda").score(ids)
    assert (got - ref).abs().max() < 1e-3


def test_bfloat16_engine_runs(tiny_llama):
    from inferkit.runtime import LLM, SamplingParams

    llm = LLM(tiny_llama, device="cuda", dtype="bfloat16")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)
