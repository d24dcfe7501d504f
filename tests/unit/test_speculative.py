"""Speculative decoding: greedy output identical to plain decoding, the sampled distribution
equal to the target's (chi-square, and the same test catching a broken rejection rule)."""

from collections import Counter

import pytest
import torch

from inferkit.errors import InferkitError
from inferkit.runtime import LLM, SamplingParams
from inferkit.runtime import speculative
from inferkit.runtime.speculative import accept_or_resample

PROMPTS = [[5, 17, 30, 2, 99], [7] * 3, list(range(40, 75)), [300, 2, 3], [5, 17, 30, 2, 99, 11]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def near_draft(tiny_llama, tmp_path_factory):
    """The tiny model with noise on its weights: a draft that agrees often, not always."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.01)
    out = tmp_path_factory.mktemp("draft") / "near"
    model.save_pretrained(out)
    for f in tiny_llama.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("options", [dict(), dict(num_kv_blocks=9, block_size=8, max_model_len=64)],
                         ids=["default", "preempting"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_equals_plain(tiny_llama, near_draft, options, k):
    prompts = [p for p in PROMPTS if len(p) + 24 <= options.get("max_model_len", 256)]
    plain = [o.token_ids for o in LLM(tiny_llama, **options).generate(prompts, GREEDY)]
    llm = LLM(tiny_llama, draft=str(near_draft), num_speculative_tokens=k, **options)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == plain
    assert [llm.generate([p], GREEDY)[0].token_ids for p in prompts] == plain
    stats = llm.engine.spec_runner.stats.summary()
    assert 0.2 < stats["acceptance_rate"] < 1.0 and len(stats["acceptance_by_position"]) == k
    assert 1.2 < stats["tokens_per_step"] <= k + 1
    if options:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_perfect_draft_is_always_accepted(tiny_llama):
    llm = LLM(tiny_llama, draft=str(tiny_llama), num_speculative_tokens=4)
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=21, ignore_eos=True))
    stats = llm.engine.spec_runner.stats.summary()
    assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_step"] == 5.0  # 1 + 4 x 5 tokens each
    assert all(len(o.token_ids) == 21 for o in outs)


def test_stop_inside_accepted_drafts_ends_there(tiny_llama):
    free = LLM(tiny_llama).generate([PROMPTS[2]], GREEDY)[0].token_ids
    stop = free[6]
    llm = LLM(tiny_llama, draft=str(tiny_llama), num_speculative_tokens=4)
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], logprobs=0))[0]
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
    assert len(out.token_times) == len(out.token_ids) == len(out.logprobs)


def test_accept_or_resample_rules():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05]])
    assert accept_or_resample(p, q, [1, 2], None, greedy=True) == [1, 2, 0]  # both argmax: bonus
    assert accept_or_resample(p, q, [2, 2], None, greedy=True) == [1]  # first rejected: correction
    g = torch.Generator().manual_seed(0)
    # q == p at position 0: always accepted; position 1 drafts token 0 with q=0.9 > p=0.2: on
    # rejection the correction comes from (p - q)+ = [0, 0.15, 0.55], never token 0.
    seen = Counter(tuple(accept_or_resample(p, q, [1, 0], g, greedy=False)) for _ in range(2000))
    assert all(t[0] == 1 for t in seen)
    accepted = sum(n for t, n in seen.items() if len(t) == 3)
    assert abs(accepted / 2000 - 0.2 / 0.9) < 0.03
    assert all(t[1] != 0 for t in seen if len(t) == 2)


def chi_square_pvalue(counts: Counter, probs: torch.Tensor) -> float:
    """Goodness of fit; categories expecting fewer than 5 samples are pooled."""
    n = sum(counts.values())
    expected = probs.double() * n
    observed = torch.tensor([counts.get(i, 0) for i in range(len(probs))], dtype=torch.float64)
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def speculative_pvalues(target, draft) -> tuple[list[float], float]:
    """Sample 4000 seeded continuations (temperature 1) speculatively; test the 2nd and 3rd tokens
    (drawn through the rejection rule) against the target's own conditional distributions."""
    prompt = [3, 7, 11]
    llm = LLM(target, draft=str(draft), num_speculative_tokens=2, max_num_seqs=512, max_num_batched_tokens=4096,
              max_model_len=32, num_kv_blocks=2048, block_size=4)
    outs = llm.generate([prompt] * 4000, [SamplingParams(temperature=1.0, max_tokens=4, seed=i, ignore_eos=True) for i in range(4000)])
    first = Counter(o.token_ids[0] for o in outs).most_common(1)[0][0]
    given_first = [o.token_ids for o in outs if o.token_ids[0] == first]
    second = Counter(t[1] for t in given_first).most_common(1)[0][0]
    p2 = torch.softmax(llm.score(prompt + [first])[-1], -1)
    p3 = torch.softmax(llm.score(prompt + [first, second])[-1], -1)
    pvalues = [chi_square_pvalue(Counter(t[1] for t in given_first), p2),
               chi_square_pvalue(Counter(t[2] for t in given_first if t[1] == second), p3)]
    return pvalues, llm.engine.spec_runner.stats.summary()["acceptance_rate"]


def test_speculative_sampling_keeps_the_target_distribution(tiny_model_factory):
    target = tiny_model_factory("t", vocab_size=24)
    draft = tiny_model_factory("d", vocab_size=24, seed=5)
    pvalues, acceptance = speculative_pvalues(target, draft)
    assert 0.2 < acceptance < 0.9  # drafts are both accepted and rejected: the rule is exercised
    assert min(pvalues) > 1e-3


def test_the_distribution_test_catches_a_broken_rule(tiny_model_factory, monkeypatch):
    """Accepting every draft token samples the draft's distribution: the test must see it."""
    def accept_all(p, q, drafts, generator, greedy):
        last = p[len(drafts)]
        return list(drafts) + [int(torch.multinomial(last, 1, generator=generator))]

    monkeypatch.setattr(speculative, "accept_or_resample", accept_all)
    target = tiny_model_factory("t", vocab_size=24)
    draft = tiny_model_factory("d", vocab_size=24, seed=5)
    assert min(speculative_pvalues(target, draft)[0]) < 1e-6


def test_bad_drafts_and_options(tiny_llama, tiny_model_factory, tmp_path):
    other_vocab = tiny_model_factory("v", vocab_size=200)
    with pytest.raises(InferkitError, match="the draft's vocabulary has 200 tokens, the model's 384"):
        LLM(tiny_llama, draft=str(other_vocab))
    with pytest.raises(InferkitError, match="num_speculative_tokens must be at least 1"):
        LLM(tiny_llama, draft=str(tiny_llama), num_speculative_tokens=0)
    import json
    import shutil

    shuffled = tmp_path / "shuffled"
    shutil.copytree(tiny_llama, shuffled)
    tok = json.loads((shuffled / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (shuffled / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InferkitError, match="tokenizer .* differs from the model's"):
        LLM(tiny_llama, draft=str(shuffled))


def test_student_cut_from_the_teacher(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    from inferkit.stages.distill import build_student, student_layer_indices

    assert student_layer_indices(30, 4) == [0, 10, 19, 29]
    assert student_layer_indices(30, 1) == [29] and student_layer_indices(2, 2) == [0, 1]
    with pytest.raises(InferkitError, match="between 1 and the teacher's 30"):
        student_layer_indices(30, 31)
    teacher = tiny_model_factory("t", num_hidden_layers=4)
    student = build_student(teacher, 2, tmp_path / "s")
    t = AutoModelForCausalLM.from_pretrained(teacher)
    s = AutoModelForCausalLM.from_pretrained(student)
    assert s.config.num_hidden_layers == 2
    assert torch.equal(s.model.layers[1].mlp.down_proj.weight, t.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    llm = LLM(teacher, draft=str(student), num_speculative_tokens=2)  # usable as a draft as is
    assert len(llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8))[0].token_ids) >= 1


def test_speculative_logprobs_match_plain(tiny_llama, near_draft):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
    plain = LLM(tiny_llama).generate([PROMPTS[0]], params)[0]
    spec = LLM(tiny_llama, draft=str(near_draft), num_speculative_tokens=3).generate([PROMPTS[0]], params)[0]
    assert spec.token_ids == plain.token_ids and len(spec.logprobs) == 12
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def with_draft_vocab(draft, ids, out):
    """A copy of ``draft`` whose head is cut to the target ids ``ids`` (draft_vocab.safetensors)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(draft, out)
    save_file({"d2t": torch.as_tensor(ids, dtype=torch.int64)}, str(out / speculative.DRAFT_VOCAB_FILE))
    return out


@pytest.mark.parametrize("options", [dict(), dict(num_kv_blocks=9, block_size=8, max_model_len=64)],
                         ids=["default", "preempting"])
def test_reduced_draft_vocabulary_keeps_greedy_output(tiny_llama, near_draft, tmp_path, options):
    prompts = [p for p in PROMPTS if len(p) + 24 <= options.get("max_model_len", 256)]
    plain = [o.token_ids for o in LLM(tiny_llama, **options).generate(prompts, GREEDY)]
    # The tokens the target actually writes, plus every third id: most drafts are possible.
    kept = sorted(set(t for out in plain for t in out) | set(range(0, 384, 3)))
    reduced = with_draft_vocab(near_draft, kept, tmp_path / "reduced")
    llm = LLM(tiny_llama, draft=str(reduced), num_speculative_tokens=3, **options)
    assert llm.engine.draft.lm_head.out_features == len(kept)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == plain
    assert llm.engine.spec_runner.stats.summary()["acceptance_rate"] > 0.2
    # A map keeping every id is the full head: the same drafts, the same statistics.
    full = LLM(tiny_llama, draft=str(near_draft), num_speculative_tokens=3, **options)
    every = LLM(tiny_llama, draft=str(with_draft_vocab(near_draft, range(384), tmp_path / "all")),
                num_speculative_tokens=3, **options)
    full.generate(prompts, GREEDY)
    every.generate(prompts, GREEDY)
    assert every.engine.spec_runner.stats.summary() == full.engine.spec_runner.stats.summary()


def test_reduced_draft_vocabulary_keeps_the_target_distribution(tiny_model_factory, tmp_path):
    target = tiny_model_factory("t", vocab_size=24)
    draft = with_draft_vocab(tiny_model_factory("d", vocab_size=24, seed=5), sorted(list(range(0, 24, 2)) + [5, 7, 9]),
                             tmp_path / "reduced")
    pvalues, acceptance = speculative_pvalues(target, draft)
    assert 0.1 < acceptance < 0.9
    assert min(pvalues) > 1e-3


def test_bad_draft_vocabulary_files(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    for name, tensors, msg in [("unsorted", {"d2t": torch.tensor([5, 3, 9])}, "distinct, ascending"),
                               ("range", {"d2t": torch.tensor([1, 2, 384])}, "below the model's vocabulary size 384"),
                               ("float", {"d2t": torch.tensor([1.0, 2.0])}, "1-D integer tensor"),
                               ("missing", {"ids": torch.tensor([1, 2])}, "must hold 'd2t'")]:
        folder = with_draft_vocab(tiny_llama, [0, 1], tmp_path / name)
        save_file(tensors, str(folder / speculative.DRAFT_VOCAB_FILE))
        with pytest.raises(InferkitError, match=msg):
            LLM(tiny_llama, draft=str(folder))
    folder = with_draft_vocab(tiny_llama, [0, 1], tmp_path / "garbage")
    (folder / speculative.DRAFT_VOCAB_FILE).write_bytes(b"not safetensors")
    with pytest.raises(InferkitError, match="not a readable draft vocabulary"):
        LLM(tiny_llama, draft=str(folder))
