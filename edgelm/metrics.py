"""All quality and speed figures (perplexity, top-1, KLD, tok/s, MFU) come from here: the trainer, `edgelm eval`,
the benchmarks and the report all use these functions.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # keep `import edgelm` free of torch
    import numpy as np
    import torch


@dataclass(frozen=True)
class LMScore:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float  # exp(nll)
    top1: float  # next-token top-1 accuracy
    tokens: int  # predicted tokens scored

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def next_token_stats(logits: "torch.Tensor", ids: "torch.Tensor") -> tuple[float, int, int]:
    """Sum of NLL, number of top-1 hits and number of predictions for next-token prediction.

    logits: [B, T, V] for ids: [B, T]; position t predicts ids[:, t + 1].
    """
    import torch.nn.functional as F

    pred = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
    hits = (pred.argmax(-1) == target).sum()
    return float(nll), int(hits), target.numel()


def as_numpy(x) -> "np.ndarray":
    """A torch tensor (any device/dtype) or array-like as a numpy array."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def kl_divergence(ref_logits, logits) -> float:
    """Mean KL(ref || model) per position, in nats. Both [..., V], numpy or torch."""
    import numpy as np

    ref, cur = log_softmax_np(as_numpy(ref_logits)), log_softmax_np(as_numpy(logits))
    return float((np.exp(ref) * (ref - cur)).sum(-1).mean())


def top1_agreement(ref_logits, logits) -> float:
    """Share of positions where both pick the same most likely token."""
    return float((as_numpy(ref_logits).argmax(-1) == as_numpy(logits).argmax(-1)).mean())


def score_lm(model, seqs: "np.ndarray", *, batch_size: int = 4, device: str | None = None) -> LMScore:
    """Perplexity and top-1 accuracy of ``model`` on packed sequences [N, T]."""
    import torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = hits = n = 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids = torch.as_tensor(seqs[i : i + batch_size], device=device)  # [B, T]
            logits = model(input_ids=ids).logits  # [B, T, V]
            a, b, c = next_token_stats(logits, ids)
            nll, hits, n = nll + a, hits + b, n + c
    model.train(was_training)
    return LMScore(nll=nll / n if n else float("nan"), ppl=perplexity(nll, n), top1=hits / n if n else float("nan"), tokens=n)


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def train_flops_per_token(student_params: int, teacher_params: int = 0) -> float:
    """6N for the student's forward+backward, plus 2N for the teacher's forward (PaLM-style MFU accounting)."""
    return 6.0 * student_params + 2.0 * teacher_params


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops


@dataclass(frozen=True)
class QualityDelta:
    """A candidate model (quantized or exported) against its fp32 reference on the same sequences."""

    ppl_ref: float  # perplexity of the reference
    ppl: float  # perplexity of the candidate
    kld: float  # mean KL(reference || candidate) per token, nats
    top1_agree: float  # share of positions where both pick the same next token
    max_abs_logit_diff: float  # largest |logit difference| seen
    tokens: int  # positions scored

    @property
    def dppl(self) -> float:
        return self.ppl - self.ppl_ref

    def as_dict(self) -> dict:
        return {**asdict(self), "dppl": self.dppl}


def compare_logits(pairs) -> QualityDelta:
    """Aggregate over ``pairs`` of (ids [T], ref_logits [T, V], cand_logits [T, V]), numpy or torch, from any runtime."""
    import numpy as np

    nll_r = nll_c = kld = agree = max_diff = 0.0
    preds = positions = 0
    for ids, ref, cand in pairs:
        ids, ref, cand = np.asarray(as_numpy(ids)), as_numpy(ref), as_numpy(cand)
        lr, lc = log_softmax_np(ref), log_softmax_np(cand)  # [T, V] float64
        rows, target = np.arange(len(ids) - 1), ids[1:]  # position t predicts ids[t + 1]
        nll_r -= float(lr[rows, target].sum())
        nll_c -= float(lc[rows, target].sum())
        preds += len(target)
        kld += float((np.exp(lr) * (lr - lc)).sum())
        agree += float((lr.argmax(-1) == lc.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(ref.astype(np.float64) - cand).max()))
        positions += len(ids)
    n = max(positions, 1)
    return QualityDelta(ppl_ref=perplexity(nll_r, preds), ppl=perplexity(nll_c, preds), kld=kld / n,
                        top1_agree=agree / n, max_abs_logit_diff=max_diff, tokens=positions)


def top_entropy(top_logprobs: Sequence[Sequence[float]]) -> float:
    """Mean over steps of -sum(p * log p) over each step's top-n log-probs (nats; the part of the entropy the top n
    carry). Plain float64 in a fixed order, so the mobile app's JavaScript (android_demo/www/router.js) gives the same
    number from wllama's ``top_logprobs``."""
    if not top_logprobs:
        return 0.0
    total = 0.0
    for step in top_logprobs:
        h = 0.0
        for lp in step:
            h -= math.exp(lp) * lp
        total += h
    return total / len(top_logprobs)


def log_softmax_np(logits: "np.ndarray") -> "np.ndarray":
    """log-softmax over the last axis of a numpy array [..., V], in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_logits(pairs) -> LMScore:
    """LMScore over ``pairs`` of (ids [T], logits [T, V]) from any runtime (numpy; no torch needed)."""
    import numpy as np

    nll = 0.0
    hits = n = 0
    for ids, logits in pairs:
        ids = np.asarray(ids)
        lp = log_softmax_np(logits[:-1])  # [T-1, V]
        target = ids[1:]  # [T-1]
        nll -= float(lp[np.arange(len(target)), target].sum())
        hits += int((lp.argmax(-1) == target).sum())
        n += len(target)
    return LMScore(nll=nll / n if n else float("nan"), ppl=perplexity(nll, n), top1=hits / n if n else float("nan"), tokens=n)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float  # sample standard deviation (0 for one run)
    n: int

    def fmt(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values) -> MeanStd:
    vals = [float(v) for v in values]
    if not vals:
        return MeanStd(float("nan"), float("nan"), 0)
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return MeanStd(mean, math.sqrt(var), len(vals))


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM on Linux (ru_maxrss is inherited across fork, so it can report
    the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def decode_roofline_tokens_per_s(bytes_per_token: float, bandwidth_bytes_per_s: float) -> float:
    """Upper bound on decode speed when every weight byte is read once per token."""
    return bandwidth_bytes_per_s / bytes_per_token if bytes_per_token > 0 else float("nan")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, loss) points, both lower-is-better: whether each is on the Pareto front (no other point is at
    least as good on both and better on one)."""
    return [not any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for c2, l2 in points) for c, l in points]


@dataclass(frozen=True)
class PowerLaw:
    """loss(D) = floor + scale * D ** -exponent, fitted to a loss (nats) against tokens seen D."""

    floor: float  # the loss no budget gets below
    scale: float
    exponent: float

    def __call__(self, tokens: float) -> float:
        return self.floor + self.scale * tokens ** -self.exponent

    def tokens_to_reach(self, loss: float) -> float | None:
        """Tokens at which the curve reaches ``loss``; None when ``loss`` is at or below its floor."""
        if loss <= self.floor:
            return None
        return (self.scale / (loss - self.floor)) ** (1 / self.exponent)


def fit_power_law(tokens: Sequence[float], loss: Sequence[float], grid: int = 400) -> PowerLaw:
    """Least-squares fit of loss = floor + scale * tokens^-exponent: a grid over the floor (0 up to just under the
    lowest loss), a linear fit of log(loss - floor) on log(tokens) at each. Needs three or more points, tokens > 0."""
    import numpy as np

    d, y = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(d) < 3 or (d <= 0).any():
        raise ValueError("a power-law fit needs three or more points with tokens > 0")
    best = None
    for floor in np.linspace(0.0, y.min() * (1 - 1e-6), grid):
        slope, icpt = np.polyfit(np.log(d), np.log(y - floor), 1)
        if slope >= 0:
            continue  # a loss that does not fall has no power law
        err = float(((floor + np.exp(icpt) * d ** slope - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, PowerLaw(float(floor), float(np.exp(icpt)), float(-slope)))
    if best is None:
        raise ValueError("the loss does not fall with tokens; no power law fits")
    return best[1]


# --- chat answers ------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def code_blocks(answer: str) -> list[str]:
    """The fenced code blocks of a markdown answer, in order (an unclosed last fence runs to the end); blocks
    tagged with a language other than python/py are left out."""
    return [body for lang, body in _FENCE.findall(answer) if lang.lower() in ("", "python", "py", "python3")]


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError):
        return None


def _functions(tree: ast.AST, name: str = "") -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The function definitions in a tree, at any depth, in walk order (only those called ``name`` if given)."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name == (name or n.name)]


def defines_function(answer: str) -> bool:
    """Whether the answer's first code block parses as Python and defines a function (at any depth)."""
    blocks = code_blocks(answer)
    tree = _parse(blocks[0]) if blocks else None
    return tree is not None and bool(_functions(tree))


# A unit of 2-80 characters (holding a letter or digit) said 4+ times in a row over 64+ characters, or one line
# said 4+ times in a row: how a small model's answer loops ("reverse_reverse_reverse_...")
_LOOP = re.compile(r"(\S.{1,79}?)\1{3,}", re.S)
LOOP_CHARS = 64
LOOP_LINES = 4
# the verified score's weights: each check passed adds its weight; the sum is divided by the weights that applied
CHECK_WEIGHTS = {"names": 1.0, "params": 1.0, "ended": 1.0, "no_loop": 1.0, "tests": 2.0}
MIN_EXPLAIN_WORDS = 15  # an explanation shorter than this says too little


def repetition_loop(text: str) -> bool:
    """Whether ``text`` holds a repetition loop (see _LOOP)."""
    for m in _LOOP.finditer(text):
        if len(m.group(0)) >= LOOP_CHARS and re.search(r"[A-Za-z0-9]", m.group(1)):
            return True
    run, last = 0, None
    for line in (ln.strip() for ln in text.splitlines()):
        run = run + 1 if line and line == last and len(line) >= 8 else 1
        last = line
        if run >= LOOP_LINES:
            return True
    return False


def parse_function_source(source: str, name: str = ""):
    """The function named ``name`` (default: the first) in a function's source as the corpus gives it (a method's
    body keeps its class indentation after the first line), or None."""
    import textwrap

    lines = source.splitlines()
    for text in (source, lines[0] + "\n" + textwrap.dedent("\n".join(lines[1:])) if len(lines) > 1 else source):
        if (tree := _parse(text)) is not None:
            return next(iter(_functions(tree, name)), None)
    return None


def parameter_names(fn) -> list[str]:
    """A function's parameter names in order (``*args`` as ``*args``), without a leading self or cls."""
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return names[1:] if names and names[0] in ("self", "cls") else names


@dataclass(frozen=True)
class AnswerCheck:
    """Checks of one chat answer that can be verified, and their one score (``score``, 0-1).

    For a "write" instruction: the answer's code (its first Python block that defines the asked name, else its
    first block) must parse, or the score is 0; then the checks are that it defines the asked name (names), with
    the asked parameters in order (params), ended before the token limit (ended), holds no repetition loop
    (no_loop), and passes the tests that apply (tests: the source docstring's doctest examples that call the
    function, or HumanEval's unit tests), run in edgelm.sandbox. For an "explain" instruction: it names the function
    (names), has at least MIN_EXPLAIN_WORDS words (params stands for that), ended and no_loop; no tests.
    score = the weights (CHECK_WEIGHTS) of the checks passed over the weights of the checks that applied; the tests
    count by the share passed."""

    kind: str  # "write", "explain" or "humaneval"
    parses: bool  # write/humaneval: the code parses; explain: the answer is not empty
    names: bool
    params: bool
    ended: bool
    no_loop: bool
    tests: tuple[int, int] | None = None  # (passed, run), None when no test applies
    detail: str = ""  # why the tests failed, from the sandbox (one line)

    @property
    def score(self) -> float:
        if not self.parses:
            return 0.0
        w = CHECK_WEIGHTS
        got = sum(w[k] for k in ("names", "params", "ended", "no_loop") if getattr(self, k))
        total = w["names"] + w["params"] + w["ended"] + w["no_loop"]
        if self.tests is not None and self.tests[1] > 0:
            got += w["tests"] * self.tests[0] / self.tests[1]
            total += w["tests"]
        return got / total

    def as_dict(self) -> dict:
        return {**asdict(self), "score": round(self.score, 6)}


def _answer_code(answer: str, name: str) -> tuple[str, ast.Module | None]:
    """(code, its tree or None if it doesn't parse): the first Python block that defines ``name``, else the first
    block; an answer without fences counts as one block when it parses."""
    fenced = code_blocks(answer)
    trees = [(b, _parse(b)) for b in fenced or [answer]]
    for b, tree in trees:
        if tree is not None and _functions(tree, name):
            return b, tree
    return trees[0] if fenced else (answer, None)


def _doctest_program(code: str, name: str, docstring: str) -> str | None:
    """A program that runs the docstring's examples against the answer's function and prints "passed run", or None
    when no example calls the bare name (or one imports it: the test would not be the answer's)."""
    import doctest

    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:
        return None
    calls = re.compile(rf"(?<![\w.]){re.escape(name)}\s*\(")
    if not any(calls.search(e.source) for e in examples) or any(
            re.search(rf"import\s.*\b{re.escape(name)}\b", e.source) for e in examples):
        return None
    return (f"_ns = {{'__name__': 'answer'}}\nexec(compile({code!r}, 'answer.py', 'exec'), _ns)\n"
            "import doctest as _d\n"
            f"_t = _d.DocTestParser().get_doctest({docstring!r}, _ns, {name!r}, None, 0)\n"
            "_r = _d.DocTestRunner(optionflags=_d.ELLIPSIS | _d.NORMALIZE_WHITESPACE).run(_t, out=lambda s: None)\n"
            "print(_r.attempted - _r.failed, _r.attempted)\n")


def check_answer(kind: str, reference: str, answer: str, ended: bool, *, tests: str = "", entry_point: str = "",
                 timeout: float = 10.0) -> AnswerCheck:
    """Verify one chat answer (AnswerCheck says what is checked). ``reference``: the asked function's source
    ("write", "explain") or HumanEval's prompt ("humaneval", with its ``tests`` and ``entry_point``)."""
    from edgelm.sandbox import run_python

    fn = parse_function_source(reference, entry_point)
    name = entry_point or (fn.name if fn is not None else "")
    loop_free = not repetition_loop(answer)
    if kind == "explain":
        prose = re.sub(r"```.*?(```|\Z)", " ", answer, flags=re.S)
        return AnswerCheck(kind, bool(answer.strip()), bool(name) and name in answer,
                           len(prose.split()) >= MIN_EXPLAIN_WORDS, ended, loop_free)
    code, tree = _answer_code(answer, name)
    if tree is None:
        return AnswerCheck(kind, False, False, False, ended, loop_free)
    mine = next(iter(_functions(tree, name)), None)
    params = mine is not None and fn is not None and parameter_names(mine) == parameter_names(fn)
    result, detail = None, ""
    if mine is not None:
        if kind == "humaneval":
            # the problem's prompt first (its imports and helper functions), then the answer, as HumanEval joins them
            program = (f"_ns = {{'__name__': 'answer'}}\nexec(compile({reference!r}, 'prompt.py', 'exec'), _ns)\n"
                       f"exec(compile({code!r}, 'answer.py', 'exec'), _ns)\n"
                       f"exec(compile({tests!r}, 'tests.py', 'exec'), _ns)\n_ns['check'](_ns[{name!r}])\n")
            r = run_python(program, timeout=timeout)
            result, detail = (int(r.ok), 1), r.detail
        elif (doc := ast.get_docstring(fn) if fn is not None else None) and (
                program := _doctest_program(code, name, doc)) is not None:
            r = run_python(program, timeout=timeout)
            counts = r.stdout.split()
            result = (int(counts[0]), int(counts[1])) if r.ok and len(counts) == 2 else (0, max(1, doc.count(">>>")))
            detail = r.detail
    elif kind == "humaneval":
        result = (0, 1)
    return AnswerCheck(kind, True, mine is not None, params, ended, loop_free, result, detail)


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / length of the longer string, over characters: 1 for equal strings, 0 for
    nothing in common (rapidfuzz's C++ Levenshtein)."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(a, b))


@dataclass(frozen=True)
class ChatScore:
    """A model's answers to instructions, against a reference model's (the teacher's) answers."""

    answers: int  # instructions answered
    finished: float  # share of answers that ended (end of turn) before the token limit
    defines_function: float  # share of answers whose first code block parses and defines a function
    edit_similarity: float  # mean edit similarity to the reference answer
    answer_ppl: float  # perplexity of the reference answers' tokens, given their prompts
    verified: float = 0.0  # mean verified score (AnswerCheck.score: the asked name and parameters, doctests, no loop)
    tests: tuple[int, int] = (0, 0)  # doctest examples passed and run, over the answers that had some to run

    def as_dict(self) -> dict:
        return asdict(self)


def score_answers(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                  device: str | None = None) -> tuple[float, int]:
    """Summed NLL (nats) and count of the ``answers`` tokens, each given its prompt (token ids, one pair at a time)."""
    import torch
    import torch.nn.functional as F

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            if not a:
                continue
            ids = torch.as_tensor([list(p) + list(a)], device=device)  # [1, P+A]
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()  # [A, V]: position t predicts t + 1
            nll += float(F.cross_entropy(logits, ids[0, len(p):], reduction="sum"))
            n += len(a)
    model.train(was_training)
    return nll, n
