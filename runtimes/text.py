"""Text side of every runtime: one tokenizer (the artifact's tokenizer.json), chat templates, streaming decode.

All backends share it, so text in and text out are identical across PyTorch, ONNX Runtime and llama.cpp (whose
own ``detokenize`` in llama-cpp-python 0.3.36 drops tokens longer than 32 bytes).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)


class TextTokenizer:
    """Encode/decode with ``tokenizers`` (fast, no transformers import), plus the chat template."""

    def __init__(self, encode: Callable[[str, bool], list[int]], decode: Callable[[Sequence[int]], str], *,
                 eos_ids: tuple[int, ...], bos_token: str = "", eos_token: str = "",
                 chat_template: str | None = None) -> None:
        self._encode, self._decode = encode, decode
        self.eos_ids = eos_ids  # ids that end generation by default
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self._compiled: tuple[str, Any] | None = None  # (template source, compiled jinja template)

    @classmethod
    def from_folder(cls, folder: Path) -> "TextTokenizer":
        """From tokenizer.json, tokenizer_config.json, chat_template.jinja and (generation_)config.json."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise EdgelmError(f"{folder}/tokenizer.json could not be read ({e}); re-export the artifact") from None
        cfg = _read_json(folder / "tokenizer_config.json")
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json", "genai_config.json"):
            c = _read_json(folder / name)
            c = c.get("model", c)  # genai_config nests it
            v = c.get("eos_token_id")
            eos_ids += v if isinstance(v, list) else [v] if isinstance(v, int) else []
        if eos and tok.token_to_id(eos) is not None:
            eos_ids.append(tok.token_to_id(eos))
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(lambda s, special=True: tok.encode(s, add_special_tokens=special).ids,
                   lambda ids: tok.decode(list(ids), skip_special_tokens=True),
                   eos_ids=tuple(dict.fromkeys(eos_ids)), bos_token=bos, eos_token=eos, chat_template=template)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special=False`` adds no tokens of the tokenizer's own (its BOS): a rendered chat
        template holds them already, as HF's apply_chat_template(tokenize=True) encodes it."""
        return self._encode(text, special)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(ids)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the model's own Jinja chat template."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise EdgelmError(f"chat message {m!r} needs 'role' and 'content'")
        return self.compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=self.bos_token, eos_token=self.eos_token)

    def compiled_template(self):
        """The chat template compiled once per tokenizer (compiling costs ~ms, and a server renders per request)."""
        if not self.chat_template:
            raise EdgelmError("this model has no chat template (chat_template.jinja or tokenizer_config.json); "
                              "pass a plain prompt instead")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg: str) -> None:
                raise EdgelmError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._compiled = (self.chat_template, env.from_string(self.chat_template))
        return self._compiled[1]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _token_str(v: Any) -> str:
    return v.get("content", "") if isinstance(v, dict) else (v or "")


class StreamDecoder:
    """Token ids in, text deltas out. A delta is emitted only once its bytes form whole characters, so a
    character split over several byte tokens arrives whole, and long tokens arrive as they are.

    The text of a window of ids is decoded and compared to the window without the new ids (the offsets approach
    of text-generation-inference), so each step costs O(window), not O(sequence).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this were emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            delta = text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text) :]


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports where a stop string begins."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""  # everything received
        self.sent = 0  # chars of self.text handed out

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent : end]
            self.text, self.sent = self.text[:end], end
            return out, True
        hold = 0  # longest suffix that is a proper prefix of a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : safe], safe
        return out, False

    def finish(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
