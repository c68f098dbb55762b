"""Multi-turn chat: the KV cache kept across calls on every runtime, ChatSession, and `edgelm chat` under a pty."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelm.runtimes.chat import ChatSession
from edgelm.runtimes.sampling import GenerationConfig
from tests.runtimes.test_runtimes import BACKENDS


@pytest.fixture
def kept(runtimes):
    """The session's runtimes with keep_cache on for one test, each starting from an empty record."""
    for rt in runtimes.values():
        rt.keep_cache = True
        rt.drop_cache()
    yield runtimes
    for rt in runtimes.values():
        rt.keep_cache = False
        rt.drop_cache()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_cache_prefills_only_the_new_tokens_and_changes_no_token(backend, kept, rt_model):
    """The fixture's greedy output has clear top-1 margins, so a reused cache must give exactly its tokens."""
    rt, p, g = kept[backend], rt_model["prompt_ids"], rt_model["greedy"]
    a = rt.generate(p, max_new_tokens=24, min_new_tokens=24)
    assert a.ids == g and a.cached_tokens == 0
    # the cache holds p + g[:23] (the last chosen token never ran): a prompt that extends it runs one token
    b = rt.generate(p + g[:12], max_new_tokens=12, min_new_tokens=12)
    assert b.ids == g[12:] and b.cached_tokens == len(p) + 11
    # a shorter prompt: the cache is cut back to it
    c = rt.generate(p + g[:6], max_new_tokens=18, min_new_tokens=18)
    assert c.ids == g[6:] and c.cached_tokens == len(p) + 5
    # a prompt that parts from the cache after 3 tokens: they are kept, the rest runs, as a fresh call would
    q = p[:3] + g[:8]
    d = rt.generate(q, max_new_tokens=8, min_new_tokens=8)
    assert d.cached_tokens == 3
    rt.keep_cache = False
    assert rt.generate(q, max_new_tokens=8, min_new_tokens=8).ids == d.ids
    rt.keep_cache = True
    # logits() in between (it resets llama.cpp's and TVM's cache): the record follows, the tokens stay exact
    rt.generate(p, max_new_tokens=24, min_new_tokens=24)
    rt.logits(p + g[:4])
    e = rt.generate(p + g[:12], max_new_tokens=12, min_new_tokens=12)
    assert e.ids == g[12:]
    # dropped: the next call prefills afresh
    rt.drop_cache()
    assert rt.generate(p + g[:12], max_new_tokens=4, min_new_tokens=4).cached_tokens == 0


def test_without_keep_cache_nothing_is_reused(runtimes, rt_model):
    rt, p = runtimes["torch"], rt_model["prompt_ids"]
    rt.generate(p, max_new_tokens=4)
    assert rt.generate(p + rt_model["greedy"][:2], max_new_tokens=4).cached_tokens == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chat_session_reuses_the_last_turn(backend, kept, rt_model):
    rt = kept[backend]
    chat = ChatSession(rt, system="sys", config=GenerationConfig(max_new_tokens=8, min_new_tokens=8))
    s1 = chat.send("hello")
    first = "".join(s1)
    t1 = s1.turn
    assert t1.text == first == t1.generation.text and t1.generation.cached_tokens == 0
    ids1 = rt.encode(rt.apply_chat_template(chat.messages()[:-1]), special=False)  # turn 1's prompt
    s2 = chat.send("and again")
    "".join(s2)
    g2 = s2.turn.generation
    ids2 = rt.encode(rt.apply_chat_template(chat.messages()[:-1]), special=False)
    common = next(i for i, (a, b) in enumerate(zip(ids1 + t1.generation.ids, ids2)) if a != b)
    assert g2.prompt_tokens == len(ids2) and g2.cached_tokens == common > len(ids1)  # the reply's tokens too
    assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant", "user", "assistant"]
    chat.reset()
    assert chat.messages() == [{"role": "system", "content": "sys"}]


def test_a_long_conversation_drops_its_oldest_turns_to_fit(kept):
    rt = kept["torch"]
    chat = ChatSession(rt, config=GenerationConfig(max_new_tokens=8, min_new_tokens=8))
    for i in range(12):
        "".join(chat.send(f"message {i} " + "word " * 40))
    ids, skip = chat.prompt_ids("last")
    assert len(ids) + 8 <= rt.context
    assert chat.history[0]["content"].startswith("message ")  # what remains starts at a user turn
    assert len(chat.history) < 24  # some were dropped along the way
    with pytest.raises(Exception, match="send a shorter one"):
        chat.prompt_ids("word " * 2000)


# --- `edgelm chat` the way a person types it -----------------------------------------------------------------------

class Pty:
    """A command on a pseudo-terminal of its own (its controlling tty: Ctrl-C there is a SIGINT, as in a shell)."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        import fcntl
        import pty
        import termios

        self.master, slave = pty.openpty()

        def ctty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, preexec_fn=ctty, close_fds=True,
                                     env=env)
        os.close(slave)
        self.out = ""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait until the output since the last match holds ``pattern`` (a regex)."""
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out)
            if m:
                self.out = self.out[m.end():]
                return m
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.out}")
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    self.out += os.read(self.master, 65536).decode("utf-8", errors="replace")
                except OSError:  # the child closed the terminal
                    pass

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _edgelm(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgelm", *args]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edgelm_chat_in_a_terminal(backend, artifacts):
    t = Pty(_edgelm("chat", str(artifacts[backend]), "--runtime", backend, "--threads", "1", "--max-new-tokens", "6",
                    "--min-new-tokens", "6", "--stats"))
    try:
        t.expect(rf"edgelm chat: .* on {backend}, context \d+")
        t.expect(r"> ")
        t.send("hello there\r")
        first = t.expect(r"\[(\d+) prompt tokens \((\d+) cached\), 6 new")
        assert first.group(2) == "0"
        t.expect(r"> ")
        t.send("and a second turn\r")
        second = t.expect(r"\[(\d+) prompt tokens \((\d+) cached\), 6 new")
        # at least the first prompt is reused (the reply's tokens too where they re-encode the same: a random
        # model's reply need not, and the exact count is test_a_chat_session_reuses_the_last_turn's)
        assert int(second.group(1)) > int(first.group(1)) and int(second.group(2)) >= int(first.group(1))
        t.send("/system be brief\r")
        t.expect(r"\(system prompt set\)")
        t.send("/reset\r")
        t.expect(r"\(conversation cleared\)")
        t.send("/nonsense\r")
        t.expect(r"unknown command /nonsense; /help lists them")
        t.send("/help\r")
        t.expect(r"/reset +forget the conversation")
        t.expect(r"> ")
        t.send("\x04")  # Ctrl-D at the prompt
        assert t.wait() == 0
        assert "Traceback" not in t.out
    finally:
        t.kill()


def test_ctrl_c_stops_a_reply_and_then_leaves(tmp_path, tiny_tokenizer_dir):
    """A reply of thousands of tokens (a long-context tiny model) is stopped by Ctrl-C; the chat goes on; a Ctrl-C
    at the prompt leaves with status 0."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.runtime_fixtures import CHATML

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    t = Pty(_edgelm("chat", str(tmp_path / "m"), "--threads", "1", "--max-new-tokens", "12000", "--min-new-tokens",
                    "12000", "--stats"))
    try:
        t.expect(r"> ")
        t.send("go on forever\r")
        time.sleep(3)  # the reply streams
        t.send("\x03")
        t.expect(r" \[stopped\]\r?\n")
        t.expect(r"> ")
        t.send("/exit\r")
        assert t.wait() == 0
        assert "Traceback" not in t.out and "KeyboardInterrupt" not in t.out
    finally:
        t.kill()
    t = Pty(_edgelm("chat", str(tmp_path / "m"), "--threads", "1"))
    try:
        t.expect(r"> ")
        # readline draws the prompt before it waits in select(); a SIGINT between the two only sets CPython's flag,
        # which it checks when select() is interrupted, so that Ctrl-C would take effect at the next key. Wait until
        # it waits (a person doesn't press Ctrl-C within that millisecond window; a loaded test machine widens it).
        time.sleep(1.0)
        t.send("\x03")  # Ctrl-C at the prompt
        assert t.wait() == 0
    finally:
        t.kill()
