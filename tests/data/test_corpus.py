from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from edgelm.data.corpus import SPLITS, Corpus, CorpusSpec, TokenStream, split_of, split_stats
from edgelm.errors import EdgelmError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_split_is_a_pure_function_of_the_key():
    keys = [f"pkg/mod{i}.py" for i in range(5000)]
    splits = [split_of(k, 0.05, 0.05) for k in keys]
    assert splits == [split_of(k, 0.05, 0.05) for k in keys]
    share = {s: splits.count(s) / len(keys) for s in SPLITS}
    assert 0.03 < share["val"] < 0.07 and 0.03 < share["test"] < 0.07


def test_no_file_lands_in_two_splits(tiny_corpus):
    c = Corpus(CorpusSpec((str(tiny_corpus),)))
    keys = {s: {d.key for d in c.docs(s)} for s in SPLITS}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    assert sum(len(v) for v in keys.values()) == len(c.files)
    assert all(keys.values()), "each split of the tiny corpus should hold a file"


def test_default_corpus_is_the_stdlib_without_site_packages():
    c = Corpus()
    assert len(c.files) > 500
    assert not any("site-packages" in key for key, _ in c.files)
    assert any(key == "json/decoder.py" for key, _ in c.files)


def test_a_stdlib_tree_elsewhere_splits_as_the_default_corpus(tmp_path):
    import shutil

    from edgelm.data.corpus import stdlib_root

    copy = tmp_path / "py"  # a few files of this Python's stdlib, as another machine would get them
    for rel in ("json/decoder.py", "json/__init__.py", "os.py", "site-packages/x.py"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_root() / rel if "site-" not in rel else stdlib_root() / "os.py", copy / rel)
    default = Corpus()
    c = Corpus(CorpusSpec((f"python-stdlib:{copy}",)))
    assert [k for k, _ in c.files] == ["json/__init__.py", "json/decoder.py", "os.py"]
    for s in SPLITS:  # the same keys land in the same splits
        assert {d.key for d in c.docs(s)} == {d.key for d in default.docs(s)} & {k for k, _ in c.files}
    with pytest.raises(EdgelmError, match="not a folder"):
        Corpus(CorpusSpec((f"python-stdlib:{tmp_path / 'nope'}",)))


def test_sources_files_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("beta = 1")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    rows = [{"text": f"record {i}"} for i in range(50)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = Corpus(CorpusSpec((str(tmp_path / "a.txt"), str(tmp_path / "d"), str(tmp_path / "*.jsonl"))))
    texts = sorted(t for s in SPLITS for t in c.texts(s))
    assert "alpha" in texts and "beta = 1" in texts
    assert sum(t.startswith("record ") for t in texts) == 50
    assert sorted(t for t in texts if t.startswith("record")) == sorted(r["text"] for r in rows)


def test_binary_and_non_utf8_are_skipped_with_counts(tmp_path):
    (tmp_path / "ok.py").write_text("x = 1\n" * 50)
    (tmp_path / "bin.py").write_bytes(b"abc\x00def")
    (tmp_path / "latin.py").write_bytes("caf\xe9".encode("latin-1"))
    c = Corpus(CorpusSpec((str(tmp_path),), val_frac=0.0, test_frac=0.0))
    assert list(c.texts("train")) == ["x = 1\n" * 50]
    st = c.read_stats["train"]
    assert (st.docs, st.skipped_binary, st.skipped_encoding) == (1, 1, 1)


def test_empty_corpus_errors(tmp_path):
    with pytest.raises(EdgelmError, match="corpus is empty"):
        Corpus(CorpusSpec((str(tmp_path),)))


def test_all_unreadable_corpus_errors(tmp_path, tok):
    for i in range(3):
        (tmp_path / f"b{i}.py").write_bytes(b"\x00" * 10)
    c = Corpus(CorpusSpec((str(tmp_path),), val_frac=0.0, test_frac=0.0))
    with pytest.raises(EdgelmError, match="no readable text in the train split.*3 binary"):
        TokenStream(c, tok, "train", 16).take(1)


def test_missing_source_errors(tmp_path):
    with pytest.raises(EdgelmError, match="not a file, folder or glob"):
        Corpus(CorpusSpec((str(tmp_path / "nope"),)))


def test_bad_jsonl_field_errors(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"body": "x"}\n')
    c = Corpus(CorpusSpec((str(tmp_path / "r.jsonl"),), val_frac=0.0, test_frac=0.0))
    with pytest.raises(EdgelmError, match="no string field 'text'"):
        list(c.texts("train"))


def test_stream_packs_fixed_length_and_is_deterministic(tiny_corpus, tok):
    c = Corpus(CorpusSpec((str(tiny_corpus),)))
    a = TokenStream(c, tok, "train", 32, seed=3, shuffle_buffer=16).take(40)
    b = TokenStream(Corpus(CorpusSpec((str(tiny_corpus),))), tok, "train", 32, seed=3, shuffle_buffer=16).take(40)
    other = TokenStream(c, tok, "train", 32, seed=4, shuffle_buffer=16).take(40)
    assert a.shape == (40, 32) and a.dtype == np.int64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other)


@pytest.mark.parametrize("shuffle", [0, 16])
def test_a_cursor_resumes_from_its_state_without_reading_again(tiny_corpus, tok, tmp_path, shuffle):
    """A cursor rebuilt from state() (through a checkpoint's torch.save / weights_only load) continues exactly where
    the first stood, across pass boundaries, and reads only the documents it still needs."""
    import torch

    from edgelm.distill.trainer import _numpy, _tensors

    import shutil

    small = tmp_path / "corpus"
    small.mkdir()
    for f in sorted(tiny_corpus.iterdir())[:6]:
        shutil.copy(f, small / f.name)

    def stream(loop: bool = True):
        return TokenStream(Corpus(CorpusSpec((str(small),), val_frac=0.0, test_frac=0.0)), tok, "train", 32,
                           seed=5, shuffle_buffer=shuffle, loop=loop)

    per_pass = len(stream(loop=False).take(10**6))
    whole = stream().cursor()
    ref = [next(whole) for _ in range(3 * per_pass)]
    assert whole.epoch >= 2, "the test crosses pass boundaries"
    cut = per_pass + per_pass // 2
    first = stream().cursor()
    for _ in range(cut):
        next(first)
    torch.save({"stream": _tensors(first.state())}, tmp_path / "state.pt")
    state = _numpy(torch.load(tmp_path / "state.pt", weights_only=True)["stream"])
    s = stream()
    reads = []
    real_read = s.corpus.read
    s.corpus.read = lambda split, i: reads.append(i) or real_read(split, i)
    resumed = s.cursor(state)
    nxt = next(resumed)
    assert len(reads) <= 3, "no replay of what was seen"
    got = [nxt] + [next(resumed) for _ in range(len(ref) - cut - 1)]
    assert all(np.array_equal(a, b) for a, b in zip(got, ref[cut:], strict=True))
    again = stream().cursor(first.state())  # the first cursor is unchanged by its state being taken
    assert np.array_equal(next(again), next(first))


def test_unshuffled_stream_is_the_concatenated_documents(tmp_path, tok):
    texts = ["def f():\n    return 1\n", "class A:\n    pass\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"m{i}.py").write_text(t)
    c = Corpus(CorpusSpec((str(tmp_path),), val_frac=0.0, test_frac=0.0))
    order = list(c.texts("train"))
    ids = []
    for t in order:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seq = 4
    got = TokenStream(c, tok, "train", seq).take(1000)
    assert got.reshape(-1).tolist() == ids[: len(ids) // seq * seq]


def test_split_stats_counts_tokens(tiny_corpus, tok):
    c = Corpus(CorpusSpec((str(tiny_corpus),)))
    st = split_stats(c, tok)
    assert set(st) == set(SPLITS)
    val_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in c.texts("val"))
    assert st["val"]["tokens"] == val_tokens
    assert st["train"]["docs"] == len(c.docs("train"))


def test_eval_sequences_spread_over_documents(tmp_path, tok):
    from edgelm.data.corpus import eval_sequences

    docs = {f"m{i}.py": f"value_{i} = {i}\n" * (30 + 10 * i) for i in range(4)}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    c = Corpus(CorpusSpec((str(tmp_path),), val_frac=0.0, test_frac=0.0))
    order = list(c.texts("train"))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in order]
    seqs = eval_sequences(c, tok, "train", 8, 6)
    assert seqs.shape == (6, 8)
    # pass 0: the first window of each document; pass 1 starts again with the first document
    expected = [d[:8] for d in ids] + [ids[0][8:16], ids[1][8:16]]
    assert seqs.tolist() == expected


def test_a_single_path_is_one_source_everywhere(tiny_corpus):
    """A str or Path is one source, not a tuple of its characters: CorpusSpec normalises what every caller passes."""
    from edgelm.bench.worker import prompt_ids
    from edgelm.coop.data import function_queries
    from edgelm.data.corpus import CorpusSpec, as_sources

    assert CorpusSpec(str(tiny_corpus)).sources == (str(tiny_corpus),)
    assert CorpusSpec(tiny_corpus).sources == (str(tiny_corpus),)
    assert as_sources([tiny_corpus, "x.py"]) == (str(tiny_corpus), "x.py") and as_sources(None) == ()
    as_str = function_queries(str(tiny_corpus), "train", 4)
    assert len(as_str) == 4 and as_str == function_queries((str(tiny_corpus),), "train", 4)

    class Chars:  # what the bench worker needs of a runtime: encode
        encode = staticmethod(lambda text: list(text.encode()))

    assert prompt_ids(Chars, str(tiny_corpus), "train", 16) == prompt_ids(Chars, (str(tiny_corpus),), "train", 16)
