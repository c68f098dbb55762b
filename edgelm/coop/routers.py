"""Routers decide per query: a score (higher = harder for the device) against a threshold.

Registered in ``edgelm.registry.ROUTERS``. A router's threshold is calibrated to a cloud budget: ``--cloud-budget
0.3`` picks the score quantile that sends about 30% of a calibration set to the cloud, and is stored with it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from edgelm.errors import EdgelmError
from edgelm.registry import ROUTERS

if TYPE_CHECKING:
    from edgelm.runtimes.base import Runtime


@dataclass
class Decision:
    score: float  # higher = harder for the device
    draft: list[int] = field(default_factory=list)  # device tokens already generated (draft routers), reusable
    seconds: float = 0.0  # the router's own latency


class Router:
    """Subclass, set ``name`` and implement ``score``; ``@ROUTERS.register`` takes the name from the class.
    A router with trained parameters stores them through ``state`` and is rebuilt by ``from_state``."""

    name: ClassVar[str] = ""  # registry name
    needs_cloud: ClassVar[bool] = True  # False for always-device
    calibrated: ClassVar[bool] = True  # False: the threshold follows from the budget alone

    def score(self, device: "Runtime", ids: Sequence[int]) -> Decision:
        raise NotImplementedError

    def threshold_for_budget(self, budget: float) -> float:  # uncalibrated routers only
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Trained parameters, stored in the router file (none by default)."""
        return {}

    @classmethod
    def from_state(cls, params: dict[str, Any]) -> "Router":
        """The router with the parameters ``state`` returned; a router that needs training refuses empty ones."""
        return cls()


@ROUTERS.register
class AlwaysDevice(Router):
    """every query on the device (baseline)"""

    name, needs_cloud, calibrated = "always-device", False, False

    def score(self, device, ids):
        return Decision(-math.inf)

    def threshold_for_budget(self, budget):
        return math.inf


@ROUTERS.register
class AlwaysCloud(Router):
    """every query to the cloud (baseline); the device answers only when the cloud fails"""

    name, calibrated = "always-cloud", False

    def score(self, device, ids):
        return Decision(math.inf)

    def threshold_for_budget(self, budget):
        return -math.inf


@ROUTERS.register
class RandomRouter(Router):
    """a share of queries to the cloud, by a hash of the prompt (reproducible); the baseline a router must beat"""

    name, calibrated = "random", False

    def score(self, device, ids):
        h = hashlib.sha256(json.dumps(list(map(int, ids))).encode()).digest()
        return Decision(int.from_bytes(h[:8], "big") / 2**64)  # uniform in [0, 1)

    def threshold_for_budget(self, budget):
        return 1.0 - budget


@ROUTERS.register
class PrefillConfidence(Router):
    """the prompt's mean negative log-likelihood under the device model (one prefill)"""

    name = "confidence"

    def score(self, device, ids):
        import time

        t0 = time.perf_counter()
        s = device.score(list(ids)) if len(ids) >= 2 else None
        return Decision(s.nll if s else 0.0, seconds=time.perf_counter() - t0)


@ROUTERS.register
class DraftConfidence(Router):
    """mean entropy of the device's first k greedy tokens; the draft is reused when the device answers"""

    name = "confidence-draft"
    k: int = 8  # draft tokens

    def score(self, device, ids):
        import time

        t0 = time.perf_counter()
        d = device.draft(ids, self.k)
        return Decision(d.mean_entropy, draft=d.ids, seconds=time.perf_counter() - t0)


@ROUTERS.register
class TopLogprobConfidence(Router):
    """entropy of the top-n log-probs of the device's first k greedy tokens (what wllama and llama.cpp's server
    report: the mobile app's auto mode)"""

    name = "confidence-topn"

    def __init__(self, k: int = 8, n: int = 5) -> None:
        if k < 1 or n < 1:
            raise EdgelmError(f"confidence-topn needs k >= 1 draft tokens and n >= 1 log-probs, got k={k}, n={n}")
        self.k = k  # draft tokens
        self.n = n  # log-probs per token, largest first

    def score(self, device, ids):
        import time

        from edgelm.metrics import top_entropy

        t0 = time.perf_counter()
        d = device.draft(ids, self.k, top_n=self.n)
        return Decision(top_entropy(d.top_logprobs), draft=d.ids, seconds=time.perf_counter() - t0)

    def state(self):
        return {"k": self.k, "n": self.n}

    @classmethod
    def from_state(cls, params):
        return cls(**params)


@dataclass
class RouterState:
    """A router with its threshold, as stored next to a served model (``--router-file``)."""

    router: str  # registry name
    threshold: float  # scores above it go to the cloud
    budget: float | None = None  # the cloud share it was calibrated for
    calibration: dict[str, Any] = field(default_factory=dict)  # how: prompts, their count, achieved share
    params: dict[str, Any] = field(default_factory=dict)  # trained parameters (learned)

    def save(self, path: str | Path) -> None:
        from edgelm.fsutil import atomic_write_json

        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "RouterState":
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise EdgelmError(f"{path} is not a router file ({e}); calibrate with `edgelm serve --cloud-budget`") from None


def check_budget(budget: float) -> None:
    if not 0.0 <= budget <= 1.0:
        raise EdgelmError(f"--cloud-budget must be a share between 0 and 1 (e.g. 0.3 for 30%), got {budget}")


def calibrate(router: Router, device: "Runtime", prompts: Sequence[Sequence[int]], budget: float) -> RouterState:
    """The threshold that sends ``budget`` of ``prompts`` to the cloud: the (1 - budget) quantile of their scores."""
    import numpy as np

    check_budget(budget)
    params = router.state()
    if not router.calibrated:
        return RouterState(router.name, router.threshold_for_budget(budget), budget, {"prompts": 0})
    if not prompts:
        raise EdgelmError("no calibration prompts; pass a corpus with functions (--data) or a --threshold")
    scores = np.array([router.score(device, p).score for p in prompts])
    if budget <= 0:
        t = math.inf
    elif budget >= 1:
        t = -math.inf
    else:
        t = float(np.quantile(scores, 1.0 - budget, method="lower"))
    share = float((scores > t).mean())
    return RouterState(router.name, t, budget, {"prompts": len(prompts), "achieved_share": share}, params)


def router_from_state(state: RouterState) -> Router:
    """The router a RouterState names, with its trained parameters."""
    return ROUTERS.get(state.router).from_state(state.params)
