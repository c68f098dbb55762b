"""The `learned` router: a small ridge regression from features the device computes itself to the expected quality
gap (cloud minus device) of a query. No external embeddings, no API key (RouteLLM's known complaint).

Features of a prompt, from one prefill and a short greedy draft on the device:
  * prompt: the mean and spread of per-token NLL, the mean entropy of the next-token distributions, log length;
  * draft: the device's first ``DRAFT_K`` greedy tokens (reused as the start of its answer when it answers): mean and
    max entropy, mean and min log-prob of the chosen tokens, its length (shorter when it stops early), the share of
    its tokens already in the prompt and the share of distinct tokens (a small model that copies or loops);
  * the pooled final hidden state, read through the tied lm_head (logits = E·h, so a fixed linear map of the mean
    hidden state) and projected to ``PROJ_DIM`` dims by a seeded random matrix. Every backend exposes logits, so
    the router works on llama.cpp, ONNX Runtime and PyTorch alike.
`edgelm route train` picks which of these groups to use, whether to add the squares and pairwise products of the
scalar features, and the ridge penalty, by cross-validation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from edgelm.coop.routers import Decision, Router
from edgelm.errors import EdgelmError
from edgelm.registry import ROUTERS

if TYPE_CHECKING:
    import numpy as np

    from edgelm.runtimes.base import Draft, Runtime

PROJ_DIM = 32  # random projection of the pooled logits
PROJ_SEED = 1234
DRAFT_K = 16  # greedy tokens drafted for the draft features
FEATURES = ("prompt_nll_mean", "prompt_nll_std", "prompt_entropy_mean", "log_prompt_tokens", "draft_entropy_mean",
            "draft_entropy_max", "draft_logprob_mean", "draft_logprob_min", "draft_tokens", "draft_in_prompt",
            "draft_distinct")  # then PROJ_DIM pooled


def features(device: "Runtime", ids: Sequence[int]) -> tuple["np.ndarray", "Draft"]:
    """[len(FEATURES) + PROJ_DIM] features of one prompt, and the draft they were computed from."""
    import numpy as np

    from edgelm.metrics import log_softmax_np

    ids = list(ids)[-min(len(ids), device.context - 1):]
    d = device.draft(ids, DRAFT_K)  # shorter when the context is nearly full
    logits = device.logits(ids)  # [T, V]
    lp = log_softmax_np(logits)  # [T, V]
    nll = -lp[np.arange(len(ids) - 1), ids[1:]] if len(ids) > 1 else np.zeros(1)  # [T-1]
    ent = -(np.exp(lp) * lp).sum(-1)  # [T]
    centered = logits - logits.mean(-1, keepdims=True)  # [T, V]; logit shifts carry no information
    proj = np.random.default_rng(PROJ_SEED).standard_normal((logits.shape[-1], PROJ_DIM)) / np.sqrt(logits.shape[-1])
    pooled = centered.mean(0) @ proj  # [PROJ_DIM]
    seen = set(ids)
    draft = [d.mean_entropy, max(d.entropy, default=0.0), float(np.mean(d.logprob)) if d.logprob else 0.0,
             min(d.logprob, default=0.0), len(d.ids), float(np.mean([t in seen for t in d.ids])) if d.ids else 0.0,
             len(set(d.ids)) / max(1, len(d.ids))]
    return np.concatenate([[nll.mean(), nll.std(), ent.mean(), np.log(len(ids))], draft, pooled]), d


def design(X: "np.ndarray", cols: list[int] | None, pairs: list[int] | None) -> "np.ndarray":
    """[N, F] features -> [N, F'] model inputs: the ``cols`` (None: all), then the squares and pairwise products of
    the ``pairs`` features (how sure the draft is matters more when the prompt is long, and so on)."""
    import numpy as np

    X = np.atleast_2d(np.asarray(X, dtype=float))  # [N, F]
    parts = [X if cols is None else X[:, cols]]
    if pairs:
        S = X[:, pairs]  # [N, P]
        iu = np.triu_indices(len(pairs))
        parts.append((S[:, :, None] * S[:, None, :])[:, iu[0], iu[1]])  # [N, P(P+1)/2]
    return np.concatenate(parts, 1)


@dataclass
class RidgeModel:
    mean: list[float]  # input means
    std: list[float]  # input standard deviations
    weights: list[float]  # on standardized inputs
    bias: float
    l2: float  # ridge penalty it was fit with
    cols: list[int] | None = None  # the features it uses (None: all)
    pairs: list[int] | None = None  # features whose squares and pairwise products it also uses

    def predict(self, x: "np.ndarray") -> float:
        import numpy as np

        z = (design(x, self.cols, self.pairs)[0] - np.asarray(self.mean)) / np.asarray(self.std)
        return float(z @ np.asarray(self.weights) + self.bias)


def fit_ridge(X: "np.ndarray", y: "np.ndarray", l2: float = 10.0, cols: list[int] | None = None,
              pairs: list[int] | None = None) -> RidgeModel:
    import numpy as np

    if len(X) < 8:
        raise EdgelmError(f"the learned router needs at least 8 training queries, got {len(X)}; pass more --queries")
    X = design(X, cols, pairs)  # [N, F']
    mean, std = X.mean(0), X.std(0) + 1e-8
    Z = (X - mean) / std  # [N, F']
    b = float(y.mean())
    w = np.linalg.solve(Z.T @ Z + l2 * np.eye(Z.shape[1]), Z.T @ (y - b))
    return RidgeModel(mean.tolist(), std.tolist(), w.tolist(), b, l2, cols, pairs)


SCALARS = list(range(len(FEATURES)))
FEATURE_SETS = {  # candidates for cross-validation: (columns, columns whose products are added)
    "prompt": (list(range(4)), None),
    "draft": (list(range(4, len(FEATURES))), None),
    "prompt+draft": (SCALARS, None),
    "all": (None, None),
    "all+products": (None, SCALARS),
}
L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _spearman(a: "np.ndarray", b: "np.ndarray") -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 0.0


def select_and_fit(X: "np.ndarray", y: "np.ndarray", folds: int = 5) -> tuple[RidgeModel, dict[str, Any]]:
    """Choose the feature set and ridge penalty by k-fold cross-validation on the training queries (mean rank
    correlation of predicted and actual gain: routing needs the order), then fit on all of them."""
    import numpy as np

    idx = np.arange(len(X))
    results = {}
    for name, (cols, pairs) in FEATURE_SETS.items():
        for l2 in L2_GRID:
            scores = []
            for f in range(folds):
                test = idx[f::folds]
                train = np.setdiff1d(idx, test)
                m = fit_ridge(X[train], y[train], l2, cols, pairs)
                scores.append(_spearman(np.array([m.predict(X[i]) for i in test]), y[test]))
            results[f"{name}/l2={l2:g}"] = (float(np.mean(scores)), name, l2)
    best_key = max(results, key=lambda k: results[k][0])
    cv, name, l2 = results[best_key]
    return fit_ridge(X, y, l2, *FEATURE_SETS[name]), {"cv_spearman": {k: round(v[0], 4) for k, v in results.items()},
                                                     "chosen": best_key}


@ROUTERS.register
class LearnedRouter(Router):
    """a ridge regression on device-computed features (prompt NLL, entropy, length; a 16-token draft's confidence and
    repetition; pooled hidden state) predicting how much better the cloud answers; trained by `edgelm route train`"""

    name = "learned"

    def __init__(self, model: RidgeModel | None = None) -> None:
        self.model = model

    def score(self, device, ids):
        if self.model is None:
            raise EdgelmError("the learned router is not trained; run `edgelm route train` and pass --router-file")
        t0 = time.perf_counter()
        x, d = features(device, ids)
        return Decision(self.model.predict(x), draft=d.ids, seconds=time.perf_counter() - t0)

    def state(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"model": asdict(self.model), "features": list(FEATURES), "draft_k": DRAFT_K, "proj_dim": PROJ_DIM,
                "proj_seed": PROJ_SEED}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LearnedRouter":
        if not state:
            raise EdgelmError("the learned router is not trained; run `edgelm route train --out FILE` and pass "
                              "--router-file FILE")
        if (state.get("features"), state.get("draft_k"), state.get("proj_dim"), state.get("proj_seed")) != (
                list(FEATURES), DRAFT_K, PROJ_DIM, PROJ_SEED):
            raise EdgelmError("this router file was trained with other features; retrain it with `edgelm route train`")
        return cls(RidgeModel(**state["model"]))
