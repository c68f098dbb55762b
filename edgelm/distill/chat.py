"""Keep an instruct teacher's chat in its student: the teacher answers instructions made from the corpus (greedy, in
its chat template), and those conversations are mixed into the distillation stream, where they get logit KD like any
other tokens (sequence-level KD on the teacher's own text, plus the teacher's full distribution at each token).

Teacher answers are cached per teacher (a fingerprint of its weights) under ``cache_dir()/chat``, so every later run,
ablation and benchmark on the same data reuses them. ``chat_eval`` measures what a user sees: answers to test-split
instructions, whether their code parses and defines a function, how close they are to the teacher's, and the
perplexity of the teacher's answers under each model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from edgelm.data.chat import Instruction, instructions
from edgelm.data.corpus import Corpus, CorpusSpec
from edgelm.errors import EdgelmError
from edgelm.fsutil import atomic_write_text, cache_dir
from edgelm.metrics import ChatScore, check_answer, defines_function, edit_similarity, perplexity, score_answers

log = logging.getLogger(__name__)

GEN_BATCH = 32  # prompts generated together (left-padded); 32 is ~3.5x the tok/s of 8 on a 2-core CPU


def need_chat_template(tok, what: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise EdgelmError(f"{what} needs a tokenizer with a chat template (an instruct model); this one has none")


def render(tok, prompt: str, answer: str | None = None, finished: bool = True) -> str:
    """The conversation as text in the tokenizer's chat template: the prompt ready for an answer, or with the answer
    (closed as the template closes a turn when ``finished``; a cut-off answer is left open)."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    if answer is None:
        return head
    if finished:
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
        if full.startswith(head + answer):
            return full
        return head + answer + (tok.eos_token or "")
    return head + answer


def _stop_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def generate(model, tok, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = GEN_BATCH,
             progress: bool = False, desc: str = "generate",
             on_batch: Callable[[list[int], list[tuple[str, bool]]], None] | None = None) -> list[tuple[str, bool]]:
    """Greedy answers (text, finished) to chat prompts, in order. Batched with left padding, longest prompts
    first so a batch pads little; ``finished`` is False for an answer cut at ``max_new_tokens``. ``on_batch``
    gets each batch's prompt indices and answers as soon as they are done."""
    device = next(model.parameters()).device
    heads = [tok(render(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    stop = _stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(heads[i]))
    out: list[tuple[str, bool] | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="answer", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(heads[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # [B, P], left-padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(heads[i]):] = torch.as_tensor(heads[i])
                mask[r, width - len(heads[i]):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
            for r, i in enumerate(idx):
                new = gen[r, width:].tolist()  # [<= max_new_tokens]
                ends = [k for k, t in enumerate(new) if t in stop]
                finished = bool(ends)
                new = new[:ends[0]] if ends else new
                out[i] = (tok.decode(new, skip_special_tokens=True), finished)
            if on_batch is not None:
                on_batch(idx, [out[i] for i in idx])  # type: ignore[misc]
            if bar is not None:
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out  # type: ignore[return-value]


def fingerprint(model) -> str:
    """sha256 over a model's weights (names, shapes, dtypes and bytes): what the answer cache is keyed by."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Answer:
    instruction: Instruction  # what was asked
    text: str  # the greedy answer
    finished: bool  # False when cut at the token limit


class AnswerCache:
    """Greedy answers of one model, one JSON line each, keyed by the rendered prompt and the token limit. Rewritten
    atomically after every generated batch, so an interrupted run keeps what it generated and never leaves half a
    file. ``AnswerCache(model, tok)`` generates with the local model (keyed by its weights);
    ``AnswerCache.served(url, ...)`` asks an OpenAI-compatible server (keyed by its URL and model name)."""

    def __init__(self, model, tok, root: Path | None = None, *, name: str | None = None,
                 produce: Callable[..., Any] | None = None) -> None:
        self.model, self.tok = model, tok
        self.path = (root or cache_dir() / "chat") / f"{name or fingerprint(model)[:24]}.jsonl"
        self._produce = produce or (lambda prompts, **kw: generate(model, tok, prompts, **kw))
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                self.entries[rec["key"]] = rec

    @classmethod
    def served(cls, url: str, tok, *, model: str = "", concurrency: int = 4, retries: int = 3, backoff: float = 1.0,
               root: Path | None = None) -> "AnswerCache":
        """Answers from a teacher on a serving engine (vLLM, llama.cpp's server, TGI): greedy chat completions,
        ``concurrency`` requests in flight, each retried on timeouts, refused connections, 429 and 5xx. The server
        applies its own chat template; the answers are rendered in ``tok``'s for training."""
        from edgelm.cloud import CloudClient, CloudConfig

        client = CloudClient(CloudConfig(url=url, model=model, read_timeout=600.0, retries=retries, backoff=backoff,
                                         breaker_failures=1 << 30))
        name = "served-" + hashlib.sha256(f"{url}\0{model}".encode()).hexdigest()[:24]
        return cls(None, tok, root, name=name, produce=functools.partial(_ask_server, client, concurrency))

    def _key(self, prompt: str, max_new_tokens: int) -> str:
        return hashlib.sha256(f"{max_new_tokens}\0{render(self.tok, prompt)}".encode()).hexdigest()

    def answers(self, instrs: Sequence[Instruction], *, max_new_tokens: int, progress: bool = False,
                desc: str = "teacher answers") -> list[Answer]:
        keys = [self._key(i.prompt, max_new_tokens) for i in instrs]
        todo = sorted({k: i for k, i in zip(keys, range(len(instrs))) if k not in self.entries}.values())
        if todo:
            log.info("%s: generating %d of %d (the rest cached in %s)", desc, len(todo), len(instrs), self.path)

            def keep(done: list[int], got: list[tuple[str, bool]]) -> None:
                for j, (text, finished) in zip(done, got):
                    i = todo[j]
                    self.entries[keys[i]] = {"key": keys[i], "instruction": instrs[i].key, "text": text,
                                             "finished": finished}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.entries.values()))

            self._produce([instrs[i].prompt for i in todo], max_new_tokens=max_new_tokens, progress=progress,
                          desc=desc, on_batch=keep)
        return [Answer(i, self.entries[k]["text"], self.entries[k]["finished"]) for i, k in zip(instrs, keys)]


def _ask_server(client, concurrency: int, prompts: Sequence[str], *, max_new_tokens: int, progress: bool = False,
                desc: str = "teacher answers",
                on_batch: Callable[[list[int], list[tuple[str, bool]]], None] | None = None) -> None:
    """Greedy answers to ``prompts`` from ``client``'s server, at most ``concurrency`` at once; each answer goes to
    ``on_batch`` (in this thread) as it arrives. A request that fails after its retries stops the rest, in one line;
    what arrived before stays with ``on_batch``."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from edgelm.cloud import CloudError

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="answer", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chat-teacher")
    try:
        futures = {pool.submit(client.chat_answer, [{"role": "user", "content": p}], max_tokens=max_new_tokens,
                               deadline=time.monotonic() + 3600, temperature=0.0): i for i, p in enumerate(prompts)}
        done = 0
        for fut in as_completed(futures):
            try:
                got = fut.result()
            except CloudError as e:
                raise EdgelmError(f"--chat-teacher-url {client.cfg.url}: no answer ({e.reason}) after {done} of "
                                  f"{len(prompts)}; those are cached: check the server and run again") from None
            done += 1
            if on_batch is not None:
                on_batch([futures[fut]], [got])
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()
        if bar is not None:
            bar.close()


def fitting(instrs: Sequence[Instruction], tok, context: int, max_new_tokens: int) -> list[Instruction]:
    """The instructions whose prompt and longest answer fit the model's context."""
    keep = [i for i in instrs if len(tok(render(tok, i.prompt), add_special_tokens=False)["input_ids"])
            + max_new_tokens <= context]
    if len(keep) < len(instrs):
        log.info("%d of %d instructions left out: prompt + %d answer tokens exceed the context of %d",
                 len(instrs) - len(keep), len(instrs), max_new_tokens, context)
    return keep


def teacher_chat(teacher, tok, corpus: Corpus, n: int, max_new_tokens: int, *, progress: bool = False,
                 served: AnswerCache | None = None) -> list[Answer]:
    """The teacher's answers to the first ``n`` train-split instructions (cached), from ``served`` (a teacher on a
    serving engine: ``AnswerCache.served``) when given, else generated by ``teacher``."""
    need_chat_template(tok, "--chat-mix")
    context = getattr(teacher.config, "max_position_embeddings", None) or 1 << 30
    instrs = fitting(instructions(corpus, "train", n), tok, context, max_new_tokens)
    if not instrs:
        raise EdgelmError(f"--chat-mix: no documented Python functions in the train split of "
                          f"{corpus.spec.describe()} to make instructions from; drop --chat-mix or add .py files")
    return (served or AnswerCache(teacher, tok)).answers(instrs, max_new_tokens=max_new_tokens, progress=progress)


class ChatStream:
    """Teacher conversations packed into fixed-length sequences [T], like TokenStream packs documents: the
    conversations are shuffled per (seed, epoch) and looped. Deterministic, so a resumed run skips exactly."""

    def __init__(self, texts: Sequence[str], tok, seq_len: int, *, seed: int = 0) -> None:
        self.ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.seq_len, self.seed = seq_len, seed
        self.tokens = sum(len(i) for i in self.ids)
        if self.tokens < seq_len:
            raise EdgelmError(f"--chat-mix: the teacher's answers hold {self.tokens} tokens, less than one "
                              f"{seq_len}-token sequence; raise --chat-examples")

    def cursor(self, state: dict | None = None) -> "ChatCursor":
        """An iterator over the sequences, from the start or from a ``ChatCursor.state()``."""
        return ChatCursor(self, state)

    def __iter__(self) -> "ChatCursor":
        return self.cursor()


class ChatCursor:
    """Where a :class:`ChatStream` stands: the pass (epoch), its next conversation and the tokens not yet packed."""

    def __init__(self, stream: ChatStream, state: dict | None = None) -> None:
        st = state or {}
        self.s = stream
        self.epoch, self.pos = int(st.get("epoch", 0)), int(st.get("pos", 0))  # pass, next position in its order
        self.buf = np.asarray(st.get("buf", ()), dtype=np.int64)  # [n] tokens not yet packed
        self._order = self._pass_order()

    def _pass_order(self) -> np.ndarray:
        order = np.arange(len(self.s.ids))
        np.random.default_rng([self.s.seed, 17, self.epoch]).shuffle(order)
        return order

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "buf": self.buf}  # buf is replaced, never written in place

    def __iter__(self) -> "ChatCursor":
        return self

    def __next__(self) -> np.ndarray:
        T = self.s.seq_len
        while len(self.buf) < T:  # the stream loops, and holds at least one sequence
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._pass_order()
            self.buf = np.concatenate((self.buf, np.asarray(self.s.ids[self._order[self.pos]], dtype=np.int64)))
            self.pos += 1
        seq, self.buf = self.buf[:T].copy(), self.buf[T:]  # [T], [n - T]
        return seq


class MixedStream:
    """Sequence i comes from ``chat`` with probability ``share`` (a fixed draw per i), else from ``code``; both are
    cursors, and ``state()`` holds theirs with the draw's generator."""

    def __init__(self, code, chat, share: float, seed: int, state: dict | None = None) -> None:
        self.code, self.chat, self.share = code, chat, share
        self.rng = np.random.default_rng([seed, 19])
        if state is not None:
            self.rng.bit_generator.state = state["rng"]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "code": self.code.state(), "chat": self.chat.state()}

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> np.ndarray:
        return next(self.chat) if self.rng.random() < self.share else next(self.code)


# --- the measure -------------------------------------------------------------------------------------------------
@dataclass
class ChatEval:
    instructions: list[Instruction]  # test-split "write" instructions, in order
    answers: dict[str, list[Answer]]  # label -> that model's greedy answers ("teacher" first)
    scores: dict[str, ChatScore] = field(default_factory=dict)  # label -> its figures against the teacher's answers
    max_new_tokens: int = 192  # answer length limit

    def as_dict(self, answers: bool = False) -> dict[str, Any]:
        out = {"instructions": len(self.instructions), "max_new_tokens": self.max_new_tokens,
               "scores": {k: v.as_dict() for k, v in self.scores.items()}}
        if answers:
            out["answers"] = [{"instruction": i.key, "prompt": i.prompt,
                               **{lb: {"text": a[k].text, "finished": a[k].finished} for lb, a in self.answers.items()}}
                              for k, i in enumerate(self.instructions)]
        return out


def score_chat(model, tok, reference: Sequence[Answer], answers: Sequence[Answer]) -> ChatScore:
    """A model's answers against the reference (teacher's) answers to the same instructions."""
    prompts = [tok(render(tok, a.instruction.prompt), add_special_tokens=False)["input_ids"] for a in reference]
    ref_ids = [tok(a.text, add_special_tokens=False)["input_ids"] for a in reference]
    nll, n = score_answers(model, prompts, ref_ids)
    checks = [check_answer(a.instruction.kind, a.instruction.reference, a.text, a.finished) for a in answers]
    return ChatScore(answers=len(answers), finished=float(np.mean([a.finished for a in answers])),
                     defines_function=float(np.mean([defines_function(a.text) for a in answers])),
                     edit_similarity=float(np.mean([edit_similarity(a.text, r.text)
                                                    for a, r in zip(answers, reference)])),
                     answer_ppl=perplexity(nll, n), verified=float(np.mean([c.score for c in checks])),
                     tests=(sum(c.tests[0] for c in checks if c.tests), sum(c.tests[1] for c in checks if c.tests)))


def chat_eval(models: dict[str, str | os.PathLike], *, teacher: str | os.PathLike = "smollm2-135m-instruct",
              data: Sequence[str] = (), n: int = 100, max_new_tokens: int = 192, threads: int | None = None,
              progress: bool = False) -> ChatEval:
    """Greedy answers of the teacher and of each model in ``models`` (label -> model) to ``n`` test-split "write"
    instructions, scored against the teacher's: the share whose code parses and defines a function, the verified
    score (edgelm.metrics.AnswerCheck: the asked name and parameters, the source's doctests run in a sandbox, no
    loop, ended), the edit similarity to the teacher's answer, and the perplexity of the teacher's answers under
    the model."""
    from edgelm.models.loader import load_model

    if n < 1 or max_new_tokens < 8:
        raise EdgelmError(f"chat eval needs n >= 1 and max_new_tokens >= 8 (--chat, --chat-max-new-tokens), got {n} "
                          f"and {max_new_tokens}")
    if threads:
        torch.set_num_threads(threads)
    t_model, tok, _ = load_model(teacher)
    need_chat_template(tok, "the chat measure")
    corpus = Corpus(CorpusSpec(tuple(data)))
    context = getattr(t_model.config, "max_position_embeddings", None) or 1 << 30
    instrs = fitting(instructions(corpus, "test", n, kinds=("write",)), tok, context, max_new_tokens)
    if not instrs:
        raise EdgelmError(f"no documented Python functions in the test split of {corpus.spec.describe()}")
    ref = AnswerCache(t_model, tok).answers(instrs, max_new_tokens=max_new_tokens, progress=progress,
                                            desc="teacher answers (test)")
    res = ChatEval(instrs, {"teacher": ref}, {"teacher": score_chat(t_model, tok, ref, ref)}, max_new_tokens)
    del t_model
    for label, path in models.items():
        model, _, _ = load_model(path)
        got = generate(model, tok, [i.prompt for i in instrs], max_new_tokens=max_new_tokens, progress=progress,
                       desc=f"{label} answers")
        res.answers[label] = [Answer(i, t, f) for i, (t, f) in zip(instrs, got)]
        res.scores[label] = score_chat(model, tok, ref, res.answers[label])
        log.info("chat %s: %.0f%% define a function (teacher %.0f%%), edit similarity %.2f, teacher-answer ppl %.2f",
                 label, 100 * res.scores[label].defines_function, 100 * res.scores["teacher"].defines_function,
                 res.scores[label].edit_similarity, res.scores[label].answer_ppl)
    return res
