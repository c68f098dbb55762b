"""`edgelm route train` and `edgelm route eval`: routers judged on queries with known answers.

Queries come from a task (edgelm.coop.data.TASKS). Device and cloud each answer every query once (greedy). For
``complete``, a query is a function's first lines, and an answer's quality is the normalized edit similarity of its
first lines to the rest; for ``chat`` and ``humaneval``, a query is an instruction answered through the chat template,
and its quality is the verified score of edgelm.metrics.check_answer (code that parses and defines the asked function,
its doctests or unit tests run in a sandbox, no loop, ended). A router at
threshold t sends the queries scoring above t to the cloud, so one pass gives its whole quality-vs-share curve:

  * PGR(share) = (quality(share) - quality_device) / (quality_cloud - quality_device), the gap recovered;
  * APGR = mean PGR over shares 0..1 (area under the curve); random routing scores 0.5;
  * CPT(x) = the smallest cloud share with PGR >= x (random needs about x).

Each of them divides by the device-to-cloud gap, so they are reported only when the gap is real: its 95% bootstrap
interval (queries resampled) lies above 0 and the gap is at least MIN_GAP of the quality's 0-1 range. Otherwise the
reports say so in one sentence (``Gap.verdict``) instead of printing APGR.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgelm.errors import EdgelmError
from edgelm.metrics import check_answer, edit_similarity

log = logging.getLogger(__name__)

ANSWER_LINES = 3  # lines of an answer compared with the reference
MIN_GAP = 0.02  # a device-to-cloud quality gap below this (of the 0-1 range) is too small to judge routing on


def answer_quality(answer: str, reference: str, lines: int = ANSWER_LINES) -> float:
    head = lambda s: "\n".join(s.splitlines()[:lines]).rstrip()  # noqa: E731
    return edit_similarity(head(answer), head(reference))


def query_quality(q, answer: str, finished: bool) -> float:
    """One answer's quality in 0-1: the edit similarity of its first lines for a completion, the verified score
    (edgelm.metrics.AnswerCheck) for a chat task."""
    if not q.chat:
        return answer_quality(answer, q.reference)
    return check_answer(q.kind, q.reference, answer, finished, tests=q.tests, entry_point=q.entry_point).score


def prompt_ids(device, q) -> list[int]:
    """The device's prompt tokens for a query: the text itself, or a chat query's user message in the chat template."""
    if not q.chat:
        return device.encode(q.prompt)
    return device.encode(device.apply_chat_template([{"role": "user", "content": q.prompt}]), special=False)


def _cloud_answer(cloud, q, max_tokens: int) -> tuple[str, bool]:
    """The cloud's greedy (text, finished) for a query, through its chat API for a chat task; may raise CloudError."""
    deadline = time.monotonic() + 120
    if q.chat:
        return cloud.chat_answer([{"role": "user", "content": q.prompt}], max_tokens=max_tokens, deadline=deadline,
                                 temperature=0.0)
    return cloud.complete(q.prompt, max_tokens=max_tokens, deadline=deadline, temperature=0.0), True


@dataclass
class Judged:
    source: str  # the query's source (Query.source): file:line, an instruction's key or a HumanEval task id
    prompt_tokens: int
    device: float  # quality of the device's answer
    cloud: float | None  # quality of the cloud's answer (None: the cloud failed, see ``error``)
    scores: dict[str, float] = field(default_factory=dict)  # router -> score
    seconds: dict[str, float] = field(default_factory=dict)  # router -> its latency
    error: str | None = None  # the cloud's failure reason (CloudError.reason) when it gave no answer


class Journal:
    """Judged queries appended to a JSONL file as each one ends, so that a run cut by a cloud failure (or Ctrl-C)
    keeps every answer it got and ``--resume`` goes on from them. Its first line is the run's settings: a resume
    with other settings is refused."""

    def __init__(self, path: Path, settings: dict[str, Any], *, resume: bool, force: bool) -> None:
        self.path = Path(path)
        self.done: dict[str, Judged] = {}  # source -> a query the cloud answered
        if self.path.exists() and resume:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            try:
                head = json.loads(lines[0])["settings"]
                rows = [Judged(**json.loads(x)) for x in lines[1:] if x.strip()]
            except (ValueError, KeyError, IndexError, TypeError):
                raise EdgelmError(f"{self.path} is not a route journal; remove it, or pass --force to start "
                                  "over") from None
            if head != settings:
                diff = sorted(k for k in set(head) | set(settings) if head.get(k) != settings.get(k))
                raise EdgelmError(f"--resume: {self.path} was run with other settings ({', '.join(diff)}); resume "
                                  "with the same flags, or pass --force to start over")
            self.done = {j.source: j for j in rows if j.cloud is not None}
            log.info("resume: %d judged queries read from %s", len(self.done), self.path)
        elif self.path.exists() and not force:
            raise EdgelmError(f"{self.path} holds a partial run; pass --resume to continue it, or --force to start "
                              "over")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
        if resume and not self.path.exists():
            log.info("resume: no journal at %s, starting afresh", self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")

    def finish(self) -> None:
        """The run ended and saved its answers: the journal is no longer needed."""
        self.path.unlink(missing_ok=True)

    def add(self, j: Judged) -> None:
        import os

        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(j)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def judge(device, cloud, queries, *, max_tokens: int = 48, routers: Sequence[Any] = (), progress: bool = True,
          journal: Journal | None = None) -> list[Judged]:
    """Both answers and every router's score for each query (greedy; chat queries through the chat template and the
    cloud's chat API). A cloud failure is recorded with the query (``error``) and the run goes on; at the end, any
    failure is one EdgelmError that says how many failed, why, and that ``--resume`` retries just those (the others
    are kept in the journal)."""
    from tqdm import tqdm

    from edgelm.cloud import CloudError

    out: list[Judged] = []
    failed: dict[str, int] = {}
    for q in tqdm(queries, desc="queries", disable=not progress, unit="q"):
        if journal is not None and q.source in journal.done:
            out.append(journal.done[q.source])
            continue
        ids = prompt_ids(device, q)
        g = device.generate(ids, max_new_tokens=max_tokens)
        dev = query_quality(q, g.text, g.finish_reason != "length")
        try:
            j = Judged(q.source, len(ids), dev, query_quality(q, *_cloud_answer(cloud, q, max_tokens)))
        except CloudError as e:
            failed[e.reason] = failed.get(e.reason, 0) + 1
            log.warning("query %s: the cloud failed (%s); recorded, --resume retries it", q.source, e.reason)
            j = Judged(q.source, len(ids), dev, None, error=e.reason)
        if j.cloud is not None:
            for r in routers:
                d = r.score(device, ids)
                j.scores[r.name], j.seconds[r.name] = float(d.score), d.seconds
        if journal is not None:
            journal.add(j)
        out.append(j)
    if failed:
        n = sum(failed.values())
        where = f"; the {len(out) - n} answered are kept in {journal.path}" if journal is not None else ""
        raise EdgelmError(f"{n} of {len(out)} queries got no cloud answer ("
                          + ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
                          + f"){where}; fix the cloud and rerun with --resume to retry just those")
    return out


def curve(judged: list[Judged], scores: Sequence[float]) -> tuple[list[float], list[float]]:
    """(cloud shares, mean quality) as the threshold sweeps from all-device to all-cloud, highest scores first."""
    import numpy as np

    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    dev = np.array([j.device for j in judged])
    cl = np.array([j.cloud for j in judged])
    shares, quality = [0.0], [float(dev.mean())]
    q = dev.copy()
    for k, i in enumerate(order, 1):
        q[i] = cl[i]
        shares.append(k / len(judged))
        quality.append(float(q.mean()))
    return shares, quality


def pgr(judged: list[Judged], quality: list[float]) -> list[float]:
    import numpy as np

    qd, qc = float(np.mean([j.device for j in judged])), float(np.mean([j.cloud for j in judged]))
    if qc <= qd:
        raise EdgelmError(f"the cloud is not better than the device on these queries (quality {qc:.3f} vs "
                          f"{qd:.3f}): nothing to route for")
    return [(x - qd) / (qc - qd) for x in quality]


@dataclass
class Gap:
    device: float  # mean answer quality of the device alone
    cloud: float  # ... of the cloud alone
    gap: float  # cloud - device
    ci95: tuple[float, float]  # 95% bootstrap interval of the gap (queries resampled)
    judgeable: bool  # the interval is above 0 and the gap at least MIN_GAP: APGR and PGR mean something

    @property
    def verdict(self) -> str:
        """One sentence for the reports: the gap with its interval, and whether routing can be judged on it."""
        figures = f"cloud - device {self.gap:+.3f}, 95% interval {self.ci95[0]:+.3f} to {self.ci95[1]:+.3f}"
        if self.judgeable:
            return f"The device-to-cloud gap is real ({figures})."
        return (f"Device and cloud are within noise on these queries ({figures}; routing needs an interval above 0 "
                f"and a gap of at least {MIN_GAP}): routing can't be judged, so APGR and PGR are not reported.")


def quality_gap(judged: list[Judged], samples: int = 2000, seed: int = 0) -> Gap:
    """The device-to-cloud gap in mean quality, with its 95% bootstrap interval."""
    import numpy as np

    dev = np.array([j.device for j in judged], dtype=float)
    diff = np.array([j.cloud for j in judged], dtype=float) - dev  # [N] per-query gain of the cloud
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (samples, len(diff)))].mean(axis=1)  # [samples]
    lo, hi = (float(x) for x in np.quantile(means, [0.025, 0.975]))
    gap = float(diff.mean())
    return Gap(float(dev.mean()), float(dev.mean()) + gap, gap, (lo, hi), lo > 0 and gap >= MIN_GAP)


@dataclass
class RouterSummary:
    router: str  # router name ("oracle": routes by the true gain)
    apgr: float  # area under the performance-gap-recovered curve against the cloud share
    cpt50: float  # cloud share needed to recover 50% of the device-to-cloud gap
    cpt80: float  # ... 80% of it
    shares: list[float]  # the curve: cloud shares
    quality: list[float]  # mean answer quality at each share
    pgr: list[float]  # share of the gap recovered at each share
    cpt80_ci95: tuple[float, float] | None = None  # 95% bootstrap interval of cpt80 (scored routers)


def summarize(judged: list[Judged], name: str, scores: Sequence[float]) -> RouterSummary:
    import numpy as np

    shares, quality = curve(judged, scores)
    g = pgr(judged, quality)

    def cpt(x: float) -> float:
        return next(s for s, p in zip(shares, g) if p >= x - 1e-12)

    return RouterSummary(name, float(np.trapezoid(g, shares)), cpt(0.5), cpt(0.8), shares, quality, g)


def bootstrap_cpt80(judged: list[Judged], scores: Sequence[float], samples: int = 500, seed: int = 0
                    ) -> tuple[float, float]:
    """95% interval of CPT(80%) over query sets resampled with replacement: how much the figure owes to which
    queries were drawn. Resamples where the cloud is not better are skipped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(samples):
        idx = rng.integers(0, len(judged), len(judged))
        sub = [judged[i] for i in idx]
        if np.mean([j.cloud for j in sub]) > np.mean([j.device for j in sub]):
            vals.append(summarize(sub, "", [scores[i] for i in idx]).cpt80)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def random_summary(judged: list[Judged], seeds: int = 200) -> RouterSummary:
    """The random router averaged over ``seeds`` orders (its expectation is the straight line)."""
    import numpy as np

    rng = np.random.default_rng(0)
    runs = [summarize(judged, "random", rng.random(len(judged))) for _ in range(seeds)]
    mean_q = np.mean([r.quality for r in runs], axis=0).tolist()
    return RouterSummary("random", float(np.mean([r.apgr for r in runs])), float(np.mean([r.cpt50 for r in runs])),
                         float(np.mean([r.cpt80 for r in runs])), runs[0].shares, mean_q, pgr(judged, mean_q))


def plot_curves(summaries: list[RouterSummary], judged: list[Judged], path: Path) -> Path:
    from edgelm.report import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.5))
    for s in summaries:
        ax.plot(s.shares, s.quality, label=f"{s.router} (APGR {s.apgr:.2f})",
                linestyle="--" if s.router == "random" else "-")
    import numpy as np

    ax.axhline(float(np.mean([j.device for j in judged])), color="gray", linewidth=0.8)
    ax.axhline(float(np.mean([j.cloud for j in judged])), color="gray", linewidth=0.8)
    ax.set_xlabel("share of queries sent to the cloud")
    ax.set_ylabel(f"mean answer quality (edit similarity, first {ANSWER_LINES} lines)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_judged(judged: list[Judged], path: Path) -> None:
    from edgelm.fsutil import atomic_write_json

    atomic_write_json(path, [asdict(j) for j in judged])


def load_judged(path: Path) -> list[Judged]:
    return [Judged(**d) for d in json.loads(Path(path).read_text(encoding="utf-8"))]
