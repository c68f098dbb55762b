from __future__ import annotations

from edgelm.data.chat import KINDS, instructions, instructions_from_source, iter_instructions
from edgelm.data.corpus import SPLITS, Corpus, CorpusSpec

SOURCE = '''
def reverse(s, *, keep=False):
    """Return the string reversed, keeping nothing else.

    Longer notes that are not part of the summary.
    """
    return s[::-1]


def short():
    """Too short."""


class Box:
    def put(self, item, where=None):
        """Put an item into the box at a place."""

    def __len__(self):
        """The number of items in the box."""


def test_something():
    """Check that reverse reverses strings."""
'''


def test_instructions_from_one_file_are_exact():
    got = instructions_from_source("pkg/mod.py", SOURCE, kinds=("write",))
    assert [(i.key, i.kind, i.prompt) for i in got] == [
        ("pkg/mod.py::reverse", "write",
         "Write a Python function reverse(s, *, keep=False). Return the string reversed, keeping nothing else."),
        ("pkg/mod.py::Box.put", "write",
         "Write a Python function put(item, where=None). Put an item into the box at a place."),
    ]
    assert got[0].reference.startswith("def reverse(s, *, keep=False):") and got[0].reference.endswith("s[::-1]")
    explain = instructions_from_source("pkg/mod.py", SOURCE, kinds=("explain",))
    assert [i.kind for i in explain] == ["explain", "explain"]
    assert explain[0].prompt == f"Explain what this Python code does:\n```python\n{got[0].reference}\n```"
    assert instructions_from_source("bad.py", "def (:\n") == []


def test_instructions_come_from_their_own_split(tiny_corpus):
    c = Corpus(CorpusSpec((str(tiny_corpus),)))
    files = {s: {d.key for d in c.docs(s)} for s in SPLITS}
    for split in SPLITS:
        got = instructions(c, split, 40)
        assert got, split
        assert {i.key.split("::")[0] for i in got} <= files[split]
        assert {i.kind for i in got} <= set(KINDS)
    train = instructions(c, "train", 60)
    assert len({i.key for i in train}) == len(train), "no instruction twice"
    assert train == instructions(c, "train", 60), "deterministic"
    assert len({i.key.split("::")[0] for i in train[:20]}) >= 10, "a prefix spreads over many files"
    every = list(iter_instructions(c, "val"))
    assert sorted(i.key for i in every) == sorted(
        i.key for key, text in c.documents("val") for i in instructions_from_source(key, text))
