"""The shared sampler: each setting does what transformers' generate does with it."""
from __future__ import annotations

import numpy as np
import pytest

from edgelm.errors import EdgelmError
from edgelm.runtimes.sampling import GenerationConfig, next_token, process_logits, sample

LOGITS = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625]))


def draws(cfg: GenerationConfig, n: int = 4000, logits=LOGITS) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    return np.bincount([next_token(logits, cfg, [], rng) for _ in range(n)], minlength=len(logits)) / n


def test_sampling_follows_the_softmax():
    freq = draws(GenerationConfig(do_sample=True, seed=0))
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_temperature_sharpens_and_flattens():
    cold = draws(GenerationConfig(do_sample=True, temperature=0.5, seed=0))
    p = np.exp(LOGITS / 0.5)
    np.testing.assert_allclose(cold, p / p.sum(), atol=0.03)
    hot = draws(GenerationConfig(do_sample=True, temperature=100.0, seed=0))
    assert hot.min() > 0.15  # nearly uniform


def test_top_k_and_top_p_restrict_the_support():
    assert (draws(GenerationConfig(do_sample=True, top_k=2, seed=0))[2:] == 0).all()
    # top_p 0.7: the smallest prefix with mass >= 0.7 is {0, 1} (0.75)
    freq = draws(GenerationConfig(do_sample=True, top_p=0.7, seed=0))
    assert (freq[2:] == 0).all() and freq[0] == pytest.approx(2 / 3, abs=0.03)
    # top_p 0.75 exactly reaches the second token: still {0, 1}, as transformers keeps it
    assert (draws(GenerationConfig(do_sample=True, top_p=0.75, seed=0))[2:] == 0).all()


def test_repetition_penalty_is_ctrl_style():
    x = process_logits(np.array([2.0, -2.0, 1.0]), GenerationConfig(repetition_penalty=2.0), seen=[0, 1])
    np.testing.assert_allclose(x, [1.0, -4.0, 1.0])  # positive / p, negative * p, unseen untouched
    assert next_token(np.array([2.0, -2.0, 1.5]), GenerationConfig(repetition_penalty=2.0), [0], None) == 2


def test_same_seed_same_draws():
    cfg = GenerationConfig(do_sample=True, seed=5)
    a = [sample(LOGITS, cfg, r) for r in [np.random.default_rng(5)] for _ in range(50)]
    b = [sample(LOGITS, cfg, r) for r in [np.random.default_rng(5)] for _ in range(50)]
    assert a == b and len(set(a)) > 1


def test_banned_ids_are_never_chosen():
    assert next_token(LOGITS, GenerationConfig(), [], None, banned=(0,)) == 1


@pytest.mark.parametrize("field, value, msg", [
    ("top_p", 1.5, r"top_p=1.5: must be in \(0, 1\]"),
    ("top_p", 0.0, r"top_p=0.0"),
    ("temperature", 0.0, "temperature=0.0: must be > 0"),
    ("top_k", -1, "top_k=-1"),
    ("max_new_tokens", 0, "max_new_tokens=0"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("num_beams", 0, "num_beams=0"),
    ("min_new_tokens", 500, "min_new_tokens=500"),
    ("stop", ("",), "stop strings must not be empty"),
])
def test_invalid_settings_are_one_line_errors(field, value, msg):
    with pytest.raises(EdgelmError, match=msg):
        GenerationConfig().with_options(**{field: value})


def test_beams_with_sampling_is_refused():
    with pytest.raises(EdgelmError, match="beam search is deterministic"):
        GenerationConfig(num_beams=2, do_sample=True).validate()
