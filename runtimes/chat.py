"""A multi-turn chat over any runtime: the history, its chat template, and the KV cache kept across turns.

    from edgelm.runtimes.api import load
    from edgelm.runtimes.chat import ChatSession
    chat = ChatSession(load("runs/demo/export/gguf-q8_0", keep_cache=True), system="You are terse.")
    for delta in chat.send("Write a function that reverses a string."):
        print(delta, end="")

Each turn renders the whole history with the model's template and encodes it without added special tokens. With
the runtime's keep_cache on, the tokens the cache already holds (the last prompt and the reply) are not prefilled
again: only the new turn is. ``repl`` is the terminal loop behind ``edgelm chat``.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, TextIO

from edgelm.errors import EdgelmError
from edgelm.runtimes.sampling import GenerationConfig

if TYPE_CHECKING:
    from edgelm.runtimes.base import Generation, Runtime

log = logging.getLogger(__name__)

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (an empty TEXT removes it)
  /exit           leave (or Ctrl-D; Ctrl-C stops a reply, and leaves at the prompt)
  /help           this list"""


@dataclass
class Turn:
    """One reply and how it was made."""

    text: str  # the assistant's reply as it was shown (cut short if interrupted)
    generation: "Generation | None"  # None when interrupted
    dropped_turns: int = 0  # oldest exchanges left out so that the prompt fit the context


@dataclass
class ChatSession:
    runtime: "Runtime"  # any backend; turn on its keep_cache to reuse the KV cache across turns
    system: str = ""  # system prompt ("" for none)
    config: GenerationConfig = field(default_factory=GenerationConfig)  # sampling and length of each reply
    history: list[dict[str, str]] = field(default_factory=list)  # user/assistant messages, oldest first

    def messages(self, user: str | None = None, skip: int = 0) -> list[dict[str, str]]:
        """The conversation as the template sees it: system, the history less its ``skip`` oldest exchanges, and
        ``user``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history[2 * skip:] + tail

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """(token ids of the rendered conversation ending in ``user``'s turn, exchanges dropped to make it fit with
        room for a reply). Raises if the new message alone is too long."""
        rt = self.runtime
        room = min(self.config.max_new_tokens, max(rt.context // 4, 1))  # a reply's minimum room
        for skip in range(len(self.history) // 2 + 1):
            ids = rt.encode(rt.apply_chat_template(self.messages(user, skip)), special=False)
            if len(ids) + room <= rt.context:
                return ids, skip
        raise EdgelmError(f"this message is {len(ids)} tokens with the system prompt, and the context holds "
                          f"{rt.context} with {room} left for the reply; send a shorter one (or raise --context)")

    def send(self, user: str) -> "ChatStream":
        """Stream the reply to ``user``; the exchange joins the history when the stream ends (or is stopped)."""
        ids, skip = self.prompt_ids(user)
        if skip:
            log.warning("the conversation passed the context of %d tokens: its %d oldest exchange(s) left out",
                        self.runtime.context, skip)
            del self.history[: 2 * skip]
        return ChatStream(self, user, self.runtime.generate(ids, self.config, stream=True), skip)


class ChatStream:
    """Iterate for the reply's text deltas; ``turn`` holds the Turn afterwards. Stopping it early (close, or an
    exception such as KeyboardInterrupt) keeps what was shown in the history and drops the cache's record."""

    def __init__(self, chat: ChatSession, user: str, stream, dropped: int) -> None:
        self._chat, self._user, self._stream, self._dropped = chat, user, stream, dropped
        self.turn: Turn | None = None
        self._it = self._deltas()

    def __iter__(self) -> Iterator[str]:
        return self._it

    def close(self) -> None:
        """Stop the reply now (what was shown joins the history)."""
        self._it.close()

    def _deltas(self) -> Iterator[str]:
        shown: list[str] = []
        done = False
        try:
            for delta in self._stream:
                shown.append(delta)
                yield delta
            done = True
        finally:
            if not done:
                self._stream.close()
                self._chat.runtime.drop_cache()  # stopped mid-step: what the cache holds is not known exactly
            g = self._stream.result if done else None
            text = g.text if g is not None else "".join(shown)
            self._chat.history += [{"role": "user", "content": self._user}, {"role": "assistant", "content": text}]
            self.turn = Turn(text, g, self._dropped)


def repl(chat: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stats: bool = False) -> int:
    """The interactive loop: read a line, stream the reply. Returns the exit status (0 on /exit, Ctrl-D, Ctrl-C)."""
    if stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    rt = chat.runtime
    print(f"edgelm chat: {rt.path} on {rt.name}, context {rt.context}. /help for commands, Ctrl-D to leave.",
          file=stdout, flush=True)
    while True:
        try:
            line = _read(stdin, stdout)
        except (EOFError, KeyboardInterrupt):
            print(file=stdout, flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                chat.reset()
                print("(conversation cleared)", file=stdout, flush=True)
            elif cmd == "/system":
                chat.system = arg.strip()
                print(f"(system prompt {'set' if chat.system else 'removed'})", file=stdout, flush=True)
            elif cmd == "/help":
                print(HELP, file=stdout, flush=True)
            else:
                print(f"unknown command {cmd}; /help lists them", file=stdout, flush=True)
            continue
        try:
            s = chat.send(line.rstrip("\n"))
        except EdgelmError as e:
            print(f"error: {e}", file=stdout, flush=True)
            continue
        try:
            for delta in s:
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:
            s.close()
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        g = s.turn.generation if s.turn else None
        if stats and g is not None:
            print(f"[{g.prompt_tokens} prompt tokens ({g.cached_tokens} cached), {len(g.ids)} new, "
                  f"TTFT {g.ttft_s * 1e3:.1f} ms, {g.decode_tokens_per_s:.1f} tok/s]", file=stdout, flush=True)


def _read(stdin: TextIO, stdout: TextIO) -> str:
    if stdin is sys.stdin and stdin.isatty():
        return input("> ")
    stdout.write("> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line
