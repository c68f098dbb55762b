"""A streaming corpus over files, folders, globs and .jsonl, split deterministically by a hash of each document key.

Documents are read one at a time; token sequences are packed on the fly, so nothing holds the corpus in memory.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# A data source "python-stdlib:PATH" is another Python's stdlib tree (say, copied from another machine), keyed and
# split exactly as the default corpus is on that machine.
STDLIB_PREFIX = "python-stdlib:"
# Folders of the stdlib tree that are not the standard library's own source.
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def as_sources(data: "str | os.PathLike | Iterable[str | os.PathLike] | None") -> tuple[str, ...]:
    """What callers pass as data (one path, or any sequence of paths/globs) as a tuple of strings: the one place
    this is normalised, so a single path never becomes a tuple of its characters."""
    if data is None:
        return ()
    if isinstance(data, (str, os.PathLike)):
        return (os.fspath(data),)
    return tuple(os.fspath(d) for d in data)


@dataclass(frozen=True)
class CorpusSpec:
    sources: tuple[str, ...] = ()  # files, folders, globs, .jsonl (a single path is one); empty = the stdlib source
    text_field: str = "text"  # field holding the text in .jsonl records
    extensions: tuple[str, ...] = (".py", ".txt", ".md", ".rst", ".jsonl")  # files taken from folders
    val_frac: float = 0.05  # share of documents in the val split
    test_frac: float = 0.05  # share of documents in the test split

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", as_sources(self.sources))
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise EdgelmError(f"val/test fractions must be in [0, 1) and sum below 1, got {self.val_frac}/{self.test_frac}")

    def describe(self) -> str:
        return ", ".join(self.sources) if self.sources else f"{STDLIB_PREFIX}{stdlib_root()}"


def split_of(key: str, val_frac: float, test_frac: float) -> str:
    """Deterministic split of a document key: the same key always lands in the same split."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < val_frac:
        return "val"
    if u < val_frac + test_frac:
        return "test"
    return "train"


@dataclass(frozen=True)
class Doc:
    key: str  # stable identity used for the split hash (path relative to its source root)
    path: str  # file on disk
    line: int | None = None  # record index inside a .jsonl file
    offset: int = 0  # byte offset of that record


@dataclass
class ReadStats:
    docs: int = 0  # documents yielded
    skipped_binary: int = 0  # files with NUL bytes
    skipped_encoding: int = 0  # files that are not UTF-8
    skipped_empty: int = 0  # empty or whitespace-only
    examples: list[str] = field(default_factory=list)  # a few skipped keys, for the log

    @property
    def skipped(self) -> int:
        return self.skipped_binary + self.skipped_encoding + self.skipped_empty


def _stdlib_files(root: Path) -> dict[str, str]:
    """{key: path} of a stdlib tree's own .py files, keyed by their path under ``root``."""
    return {p.relative_to(root).as_posix(): str(p) for p in root.rglob("*.py")
            if _STDLIB_SKIP.isdisjoint(p.relative_to(root).parts)}


class Corpus:
    """Documents of a :class:`CorpusSpec`, listed once (paths only) and read lazily."""

    def __init__(self, spec: CorpusSpec | None = None) -> None:
        self.spec = spec or CorpusSpec()
        self.files = self._list_files()  # [(key, path)]
        if not self.files:
            raise EdgelmError(f"the corpus is empty: no files found in {self.spec.describe()}; pass --data with files, folders, globs or .jsonl")
        self._docs: dict[str, list[Doc]] | None = None
        self.read_stats = {s: ReadStats() for s in SPLITS}

    def _list_files(self) -> list[tuple[str, str]]:
        out: dict[str, str] = {}
        if not self.spec.sources:
            return sorted(_stdlib_files(stdlib_root()).items())
        for src in self.spec.sources:
            p = Path(src).expanduser()
            if src.startswith(STDLIB_PREFIX):
                root = Path(src[len(STDLIB_PREFIX):]).expanduser()
                if not root.is_dir():
                    raise EdgelmError(f"data source {src!r}: {root} is not a folder; give the path of a Python "
                                      "stdlib tree (the folder that holds os.py)")
                out.update(_stdlib_files(root))
            elif p.is_dir():
                for f in p.rglob("*"):
                    if f.is_file() and f.suffix in self.spec.extensions and "__pycache__" not in f.parts:
                        out[f"{p.name}/{f.relative_to(p).as_posix()}"] = str(f)
            elif p.is_file():
                out[p.name] = str(p)
            elif any(c in src for c in "*?["):
                for f in sorted(glob.glob(os.path.expanduser(src), recursive=True)):
                    if os.path.isfile(f):
                        out[os.path.relpath(f, os.path.dirname(src.split("*")[0]) or ".")] = f
            else:
                raise EdgelmError(f"data source {src!r} is not a file, folder or glob that matches anything")
        return sorted(out.items())

    def docs(self, split: str) -> list[Doc]:
        """Documents of one split, in a fixed order (hash order, so a prefix is a fair sample)."""
        if split not in SPLITS:
            raise EdgelmError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if self._docs is None:
            docs: dict[str, list[Doc]] = {s: [] for s in SPLITS}
            for key, path in self.files:
                if path.endswith(".jsonl"):
                    # A .jsonl record is a document: split per record (each keeps its own key).
                    with open(path, "rb") as f:
                        i, offset = 0, 0
                        while line := f.readline():
                            if line.strip():
                                k = f"{key}#{i}"
                                docs[split_of(k, self.spec.val_frac, self.spec.test_frac)].append(Doc(k, path, i, offset))
                            i, offset = i + 1, offset + len(line)
                else:
                    docs[split_of(key, self.spec.val_frac, self.spec.test_frac)].append(Doc(key, path))
            for s in SPLITS:
                docs[s].sort(key=lambda d: hashlib.sha256(d.key.encode()).digest())
            self._docs = docs
        return self._docs[split]

    def texts(self, split: str, *, seed: int | None = None, epoch: int = 0) -> Iterator[str]:
        """Yield document texts. With ``seed``, documents are shuffled per (seed, epoch)."""
        for _, text in self.documents(split, seed=seed, epoch=epoch):
            yield text

    def documents(self, split: str, *, seed: int | None = None, epoch: int = 0) -> Iterator[tuple[str, str]]:
        """Yield (key, text) of readable documents, in split order or shuffled per (seed, epoch)."""
        docs = self.docs(split)
        self.read_stats[split] = ReadStats()  # counts of the latest pass
        for i in self.order(split, seed=seed, epoch=epoch):
            text = self.read(split, int(i))
            if text is not None:
                yield docs[i].key, text

    def order(self, split: str, *, seed: int | None = None, epoch: int = 0) -> np.ndarray:
        """Document indices of one pass: split order, or shuffled per (seed, epoch)."""
        order = np.arange(len(self.docs(split)))
        if seed is not None:
            np.random.default_rng([seed, epoch]).shuffle(order)
        return order

    def read(self, split: str, i: int) -> str | None:
        """The text of document ``i`` of a split, or None when it is skipped (counted in ``read_stats``)."""
        stats = self.read_stats[split]
        text = self._read(self.docs(split)[i], stats)
        if text is not None:
            stats.docs += 1
        return text

    def _read(self, doc: Doc, stats: ReadStats) -> str | None:
        try:
            if doc.line is not None:
                with open(doc.path, "rb") as f:
                    f.seek(doc.offset)
                    raw = f.readline()
                rec = json.loads(raw.decode("utf-8"))
                text = rec.get(self.spec.text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise EdgelmError(f"{doc.path} line {doc.line + 1}: no string field {self.spec.text_field!r}; pass --text-field")
            else:
                raw = Path(doc.path).read_bytes()
                if b"\x00" in raw:
                    stats.skipped_binary += 1
                    self._note_skip(stats, doc)
                    return None
                text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_encoding += 1
            self._note_skip(stats, doc)
            return None
        except json.JSONDecodeError as e:
            raise EdgelmError(f"{doc.path} line {doc.line + 1} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not text.strip():
            stats.skipped_empty += 1
            return None
        return text

    @staticmethod
    def _note_skip(stats: ReadStats, doc: Doc) -> None:
        if len(stats.examples) < 3:
            stats.examples.append(doc.key)


class TokenStream:
    """Packs tokenized documents of one split into fixed-length sequences, streaming.

    Deterministic given (corpus, tokenizer, seq_len, seed): sequence i is always the same, across processes and
    restarts. Iterating gives a :class:`TokenCursor`, whose ``state()`` a checkpoint keeps, so a resumed run continues
    where it stood (``cursor(state)``) without reading again what it has seen.
    """

    def __init__(self, corpus: Corpus, tokenizer, split: str, seq_len: int, *, seed: int | None = None,
                 shuffle_buffer: int = 0, loop: bool = False) -> None:
        if seq_len < 2:
            raise EdgelmError(f"--seq-len must be at least 2, got {seq_len}")
        self.corpus, self.tok, self.split, self.seq_len = corpus, tokenizer, split, seq_len
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop
        eos = tokenizer.eos_token_id
        self.sep = [eos] if eos is not None else []

    def cursor(self, state: dict | None = None) -> "TokenCursor":
        """An iterator over the sequences, from the start or from a ``TokenCursor.state()``."""
        return TokenCursor(self, state)

    def __iter__(self) -> "TokenCursor":
        return self.cursor()

    def take(self, n: int) -> np.ndarray:
        """The first ``n`` sequences as an [n, T] array (fewer if the split is short)."""
        out = []
        for seq in self:
            out.append(seq)
            if len(out) == n:
                break
        return np.stack(out) if out else np.zeros((0, self.seq_len), dtype=np.int64)


class TokenCursor:
    """Where a :class:`TokenStream` stands: the pass (epoch) and its next document, the tokens read but not yet
    packed, and the shuffle pool with its generator. ``state()`` is cheap (views and references, taken per item when
    a thread reads ahead): a dict of ints, numpy arrays and the generator's state, which a checkpoint keeps."""

    def __init__(self, stream: TokenStream, state: dict | None = None) -> None:
        self.s = stream
        st = state or {}
        self.epoch, self.doc = int(st.get("epoch", 0)), int(st.get("doc", 0))  # pass, next position in its order
        self.produced = bool(st.get("produced", False))  # this pass has packed a sequence
        self.buf = np.asarray(st.get("buf", ()), dtype=np.int64)  # [n] tokens read, not yet packed, from self.at
        self.at = 0
        self.pool: list[np.ndarray] = [np.asarray(r, dtype=np.int64) for r in st.get("pool", ())]  # [T] each
        self.draining = bool(st.get("draining", False))  # the packed stream ended; the pool is emptied in order
        self.ended = bool(st.get("ended", False))
        self.rng = np.random.default_rng([stream.seed or 0, 7])
        if "rng" in st:
            self.rng.bit_generator.state = st["rng"]
        self._order: np.ndarray | None = None

    def state(self) -> dict:
        # arrays are never written in place (buf is replaced, pool rows are swapped), so views and references do
        return {"epoch": self.epoch, "doc": self.doc, "produced": self.produced, "buf": self.buf[self.at:],
                "pool": list(self.pool), "draining": self.draining, "ended": self.ended,
                "rng": self.rng.bit_generator.state}

    def _packed(self) -> np.ndarray | None:
        """The next packed sequence [T], or None at the end of the split (of the stream, unless it loops)."""
        s, T = self.s, self.s.seq_len
        while len(self.buf) - self.at < T and not self.ended:
            if self._order is None:
                self._order = s.corpus.order(s.split, seed=s.seed, epoch=self.epoch)
                if self.doc == 0:
                    s.corpus.read_stats[s.split] = ReadStats()
            if self.doc < len(self._order):
                text = s.corpus.read(s.split, int(self._order[self.doc]))
                self.doc += 1
                if text is not None:
                    ids = s.tok(text, add_special_tokens=False)["input_ids"] + s.sep
                    self.buf, self.at = np.concatenate((self.buf[self.at:], np.asarray(ids, dtype=np.int64))), 0
                continue
            if not self.produced:  # a whole pass without one sequence: the split is shorter than seq_len
                stats = s.corpus.read_stats[s.split]
                if stats.docs == 0:
                    raise EdgelmError(
                        f"no readable text in the {s.split} split of {s.corpus.spec.describe()}: "
                        f"{stats.skipped_binary} binary, {stats.skipped_encoding} non-UTF-8 and {stats.skipped_empty} "
                        "empty files skipped; pass --data with UTF-8 text"
                    )
                self.ended = True
            elif not s.loop:
                self.ended = True
            else:
                self.epoch, self.doc, self.produced, self._order = self.epoch + 1, 0, False, None
        if len(self.buf) - self.at < T:
            return None
        self.produced = True
        self.at += T
        return self.buf[self.at - T:self.at].copy()  # [T]

    def __iter__(self) -> "TokenCursor":
        return self

    def __next__(self) -> np.ndarray:
        if self.s.shuffle_buffer <= 1:
            seq = self._packed()
            if seq is None:
                raise StopIteration
            return seq
        while not self.draining:
            seq = self._packed()
            if seq is None:
                self.draining = True
                self.rng.shuffle(self.pool)
            elif len(self.pool) < self.s.shuffle_buffer:
                self.pool.append(seq)
            else:  # swap with a random pool entry
                j = int(self.rng.integers(len(self.pool)))
                self.pool[j], seq = seq, self.pool[j]
                return seq
        if self.pool:
            return self.pool.pop(0)
        raise StopIteration


def split_stats(corpus: Corpus, tokenizer, *, batch_docs: int = 64) -> dict[str, dict[str, int]]:
    """Documents, bytes and tokens per split. Tokenizes every document once, in batches."""
    out = {}
    for split in SPLITS:
        docs = tokens = nbytes = 0
        batch: list[str] = []

        def flush() -> int:
            enc = tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch.clear()
            return sum(len(e) + 1 for e in enc)  # +1 for the separator

        for text in corpus.texts(split):
            docs += 1
            nbytes += len(text.encode("utf-8"))
            batch.append(text)
            if len(batch) == batch_docs:
                tokens += flush()
        if batch:
            tokens += flush()
        out[split] = {"docs": docs, "bytes": nbytes, "tokens": tokens}
    return out


def eval_sequences(corpus: Corpus, tokenizer, split: str, seq_len: int, n: int) -> np.ndarray:
    """``n`` evaluation sequences [n, T] spread over documents: pass k takes window k of every document.

    A packed prefix of a split would come from one or two files; this samples many. Splits whose documents
    are all shorter than ``seq_len`` fall back to packed sequences.
    """
    windows: list[list[list[int]]] = []
    out: list[list[int]] = []
    for text in corpus.texts(split):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        w = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if w:
            windows.append(w)
            out.append(w[0])
            if len(out) == n:
                return np.asarray(out, dtype=np.int64)
    k = 1
    while len(out) < n and any(len(w) > k for w in windows):
        out += [w[k] for w in windows if len(w) > k][: n - len(out)]
        k += 1
    if not out:
        return TokenStream(corpus, tokenizer, split, seq_len).take(n)
    return np.asarray(out, dtype=np.int64)
