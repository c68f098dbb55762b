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
        order = np.arange(len(docs))
        if seed is not None:
            np.random.default_rng([seed, epoch]).shuffle(order)
        stats = self.read_stats[split] = ReadStats()  # counts of the latest pass
        for i in order:
            text = self._read(docs[i], stats)
            if text is not None:
                stats.docs += 1
                yield docs[i].key, text

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

    Deterministic given (corpus, tokenizer, seq_len, seed): sequence i is always the same, across
    processes and restarts, so a resumed run skips exactly the sequences it has seen.
    """

    def __init__(self, corpus: Corpus, tokenizer, split: str, seq_len: int, *, seed: int | None = None,
                 shuffle_buffer: int = 0, loop: bool = False) -> None:
        if seq_len < 2:
            raise EdgelmError(f"--seq-len must be at least 2, got {seq_len}")
        self.corpus, self.tok, self.split, self.seq_len = corpus, tokenizer, split, seq_len
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop
        eos = tokenizer.eos_token_id
        self.sep = [eos] if eos is not None else []

    def _packed(self) -> Iterator[np.ndarray]:
        buf: list[int] = []
        epoch = 0
        while True:
            produced = False
            for text in self.corpus.texts(self.split, seed=self.seed, epoch=epoch):
                buf.extend(self.tok(text, add_special_tokens=False)["input_ids"])
                buf.extend(self.sep)
                while len(buf) >= self.seq_len:
                    produced = True
                    yield np.asarray(buf[: self.seq_len], dtype=np.int64)  # [T]
                    del buf[: self.seq_len]
            if not produced:
                stats = self.corpus.read_stats[self.split]
                if stats.docs == 0:
                    raise EdgelmError(
                        f"no readable text in the {self.split} split of {self.corpus.spec.describe()}: "
                        f"{stats.skipped_binary} binary, {stats.skipped_encoding} non-UTF-8 and {stats.skipped_empty} "
                        "empty files skipped; pass --data with UTF-8 text"
                    )
                return
            if not self.loop:
                return
            epoch += 1

    def __iter__(self) -> Iterator[np.ndarray]:
        it = self._packed()
        if self.shuffle_buffer <= 1:
            yield from it
            return
        rng = np.random.default_rng([self.seed or 0, 7])
        pool: list[np.ndarray] = []
        for seq in it:
            if len(pool) < self.shuffle_buffer:
                pool.append(seq)
                continue
            j = int(rng.integers(len(pool)))
            pool[j], seq = seq, pool[j]
            yield seq
        rng.shuffle(pool)
        yield from pool

    def take(self, n: int) -> np.ndarray:
        """The first ``n`` sequences as an [n, T] array (fewer if the split is short)."""
        out = []
        for seq in self:
            out.append(seq)
            if len(out) == n:
                break
        return np.stack(out) if out else np.zeros((0, self.seq_len), dtype=np.int64)


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
