"""Every registered runtime: greedy parity across backends, seeded sampling, streaming, stops, beams, chat, score."""
from __future__ import annotations

import pytest

from edgelm.registry import RUNTIMES
from edgelm.runtimes.sampling import GenerationConfig
from tests.runtime_fixtures import EMOJI, LONG, PROMPT

BACKENDS = ["torch", "llamacpp", "onnx", "tvm"]


def test_every_runtime_is_tested():
    assert sorted(BACKENDS) == RUNTIMES.names()


def test_fixture_generates_long_and_split_tokens(rt_model):
    g = rt_model["greedy"]
    assert rt_model["long_id"] in g
    i = g.index(rt_model["emoji_ids"][0])
    assert g[i : i + 4] == rt_model["emoji_ids"]
    assert len(LONG.encode()) > 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_pytorch(backend, runtimes, rt_model):
    """fp32 artifacts: the same greedy tokens as transformers' generate, on every backend."""
    rt = runtimes[backend]
    assert rt.greedy(rt_model["prompt_ids"], 24) == rt_model["greedy"]
    # from text: the shared tokenizer gives every backend the same ids and the same text back
    g = rt.generate(PROMPT, max_new_tokens=24, min_new_tokens=24)
    assert g.ids == rt_model["greedy"] and g.prompt_tokens == len(rt_model["prompt_ids"])
    assert g.text == rt_model["tokenizer"].decode(rt_model["greedy"], skip_special_tokens=True)
    assert LONG in g.text and EMOJI in g.text
    assert g.finish_reason == "length"


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_is_whole_characters(backend, runtimes, rt_model):
    rt = runtimes[backend]
    s = rt.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, stream=True)
    deltas = list(s)
    assert "".join(deltas) == s.result.text
    assert LONG in deltas or any(LONG in d for d in deltas)  # the 41-byte token arrives, not dropped
    assert any(EMOJI in d for d in deltas)  # its four byte tokens were held until the character was whole


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_is_reproducible(backend, runtimes):
    rt = runtimes[backend]
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.2, seed=7)
    a, b = rt.generate(PROMPT, cfg).ids, rt.generate(PROMPT, cfg).ids
    c = rt.generate(PROMPT, cfg.with_options(seed=8)).ids
    assert a == b and a != c
    # top_k=1 is greedy whatever the seed: the settings mean the same on every backend
    assert rt.generate(PROMPT, cfg.with_options(top_k=1)).ids == rt.greedy(rt.encode(PROMPT), 16)


def test_seeded_sampling_agrees_across_exact_backends(runtimes):
    """torch and ONNX fp32 logits agree to ~1e-5, so the shared sampler draws the same tokens from the same seed."""
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=True, top_p=0.9, seed=3)
    assert runtimes["torch"].generate(PROMPT, cfg).ids == runtimes["onnx"].generate(PROMPT, cfg).ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_string_and_stop_ids(backend, runtimes, rt_model):
    rt = runtimes[backend]
    full = rt.generate(PROMPT, max_new_tokens=24, min_new_tokens=24).text
    stop = LONG[:12]  # starts inside the output: generation ends before it
    s = rt.generate(PROMPT, max_new_tokens=24, stop=(stop,), stream=True)
    deltas = list(s)
    assert s.result.text == full[: full.index(stop)] == "".join(deltas)
    assert s.result.finish_reason == "stop" and not any("=" * 5 in d for d in deltas)
    g = rt.generate(PROMPT, max_new_tokens=24, stop_ids=(rt_model["long_id"],))
    assert g.finish_reason == "stop" and g.ids == rt_model["greedy"][: rt_model["greedy"].index(rt_model["long_id"])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search(backend, runtimes):
    """Beam search keeps the best of several paths: its log-probability is at least greedy's."""
    rt = runtimes[backend]
    ids = rt.encode(PROMPT)
    beam = rt.generate(ids, num_beams=4, max_new_tokens=8, min_new_tokens=8)
    greedy = rt.generate(ids, max_new_tokens=8, min_new_tokens=8)

    def logprob(new):
        from edgelm.metrics import log_softmax_np

        lp = log_softmax_np(rt.logits(ids + new))  # [T, V]
        return sum(lp[len(ids) - 1 + i, t] for i, t in enumerate(new))

    assert len(beam.ids) == 8 and logprob(beam.ids) >= logprob(greedy.ids) - 1e-4
    if backend == "onnx":
        assert beam.ids == runtimes["torch"].generate(ids, num_beams=4, max_new_tokens=8, min_new_tokens=8).ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_repetition_penalty_changes_choices(backend, runtimes):
    rt = runtimes[backend]
    plain = rt.generate(PROMPT, max_new_tokens=24, min_new_tokens=24).ids
    pen = rt.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, repetition_penalty=5.0).ids
    assert pen != plain
    assert len(set(pen)) >= len(set(plain))  # fewer repeats


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_template_matches_transformers(backend, runtimes, rt_model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi  there 🙂"}]
    want = rt_model["tokenizer"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert runtimes[backend].apply_chat_template(msgs) == want
    assert runtimes[backend].chat(msgs, max_new_tokens=4, min_new_tokens=4).prompt_tokens == len(
        rt_model["tokenizer"](want, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_matches_pytorch(backend, runtimes):
    ref = runtimes["torch"].score(PROMPT * 3)
    s = runtimes[backend].score(PROMPT * 3)
    assert s.tokens == ref.tokens and s.ppl == pytest.approx(ref.ppl, rel=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_is_greedy_with_its_confidence(backend, runtimes, rt_model):
    """draft = the first k greedy tokens, with each step's entropy and chosen log-prob, as on PyTorch."""
    rt, ids = runtimes[backend], rt_model["prompt_ids"]
    d, ref = rt.draft(ids, 6), runtimes["torch"].draft(ids, 6)
    assert d.ids == rt_model["greedy"][:6] and len(d.entropy) == len(d.logprob) == 6
    # the argmax token's log-prob is at least minus the entropy (H = E[-log p] >= -log p_max)
    assert all(lp <= 0 and lp >= -h - 1e-6 for lp, h in zip(d.logprob, d.entropy))
    assert d.entropy == pytest.approx(ref.entropy, rel=1e-3, abs=1e-4)
    assert d.logprob == pytest.approx(ref.logprob, rel=1e-3, abs=1e-4)
    assert d.mean_entropy == pytest.approx(sum(d.entropy) / 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_short_sampled_call_does_not_size_the_next_long_one(backend, runtimes, rt_model):
    """Each call sizes its own KV cache: a short sampled (or penalised) generate, then a longer prompt's draft and
    generate, give what they give on a fresh runtime (ONNX once kept the short call's genai max_length)."""
    rt, ids = runtimes[backend], rt_model["prompt_ids"]
    long_ids = (ids * 4)[: min(rt.context - 16, 4 * len(ids))]
    rt.generate(ids[:4], max_new_tokens=2, do_sample=True, seed=1)
    rt.generate(ids[:4], max_new_tokens=2, repetition_penalty=1.3)
    d = rt.draft(long_ids, 8)  # genai overflowed its max_length here
    greedy = rt.generate(long_ids, max_new_tokens=8).ids  # genai's native loop, sized by its own call
    assert d.ids[: len(greedy)] == greedy and len(d.ids) in (len(greedy), len(greedy) + 1)  # + the stop id
    assert rt.generate(long_ids, max_new_tokens=4, do_sample=True, seed=3).ids == rt.generate(
        long_ids, max_new_tokens=4, do_sample=True, seed=3).ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_longer_than_context(backend, artifacts):
    from edgelm.errors import EdgelmError
    from edgelm.runtimes.api import load

    with load(artifacts[backend], runtime=backend, threads=1, context=16) as rt:
        assert rt.context == 16
        with pytest.raises(EdgelmError, match=r"the prompt has \d+ tokens but the context holds 16; shorten it"):
            rt.generate(PROMPT * 2)
        g = rt.generate(rt.encode(PROMPT)[:10], max_new_tokens=50)  # capped by the context, with a warning
        assert len(g.ids) <= 6
        assert len(rt.draft(rt.encode(PROMPT)[:12], 16).ids) <= 4  # a draft stops at the context too
        with pytest.raises(EdgelmError, match="the context holds 16"):
            rt.draft(rt.encode(PROMPT * 2), 4)


def test_pytorch_opens_a_gguf_artifact(runtimes, artifacts, rt_model):
    """--runtime torch on a GGUF: transformers dequantizes it; the same greedy tokens as llama.cpp's."""
    from edgelm.runtimes.api import load

    with load(artifacts["llamacpp"], runtime="torch", threads=1) as rt:
        assert rt.name == "torch"
        assert rt.greedy(rt_model["prompt_ids"], 24) == rt_model["greedy"]


def test_default_threads_are_picked_and_logged(artifacts, caplog):
    import logging

    from edgelm.runtimes.api import load

    from edgelm.runtimes.base import physical_cores

    with caplog.at_level(logging.INFO):
        with load(artifacts["llamacpp"]) as rt:
            assert rt.threads == physical_cores()
    assert f"llamacpp: {rt.threads} thread(s) (" in caplog.text


def test_bare_gguf_reads_long_tokens_from_llamacpp_vocab(artifacts, rt_model, tmp_path):
    """A .gguf without tokenizer.json uses llama.cpp's vocab; pieces are read with a buffer that fits any token
    (llama-cpp-python's own detokenize drops tokens over 32 bytes)."""
    import shutil

    from edgelm.runtimes.api import load

    shutil.copy(artifacts["llamacpp"] / "model.gguf", tmp_path / "m.gguf")
    with load(tmp_path / "m.gguf", threads=1) as rt:
        assert rt.decode([rt_model["long_id"]]) == LONG
        assert rt.encode(PROMPT) == rt_model["prompt_ids"]
        g = rt.generate(PROMPT, max_new_tokens=24, min_new_tokens=24)
        assert g.ids == rt_model["greedy"] and LONG in g.text and EMOJI in g.text
        # generation ends at every end-of-generation token llama.cpp knows, <|im_end|> (found by name) as well
        # as the eos
        im_end = rt.native_tokenize("<|im_end|>")
        assert len(im_end) == 1 and set(rt.tokenizer.eos_ids) == {rt.llm.token_eos(), im_end[0]}
