"""Streaming decode and stop strings, on the tiny tokenizer."""
from __future__ import annotations

from edgelm.runtimes.text import StopMatcher, StreamDecoder, TextTokenizer


def _tok(tiny_tokenizer_dir) -> TextTokenizer:
    return TextTokenizer.from_folder(tiny_tokenizer_dir)


def test_split_character_arrives_whole(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    ids = tok.encode("a🙂b日本")
    assert len(ids) > 4  # byte tokens: the characters are split
    dec = StreamDecoder(tok.decode)
    deltas = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(deltas) == "a🙂b日本"
    assert "🙂" in deltas and not any("\ufffd" in d for d in deltas)


def test_incomplete_bytes_at_the_end_are_flushed(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    ids = tok.encode("x🙂")[:-1]  # the emoji's last byte missing
    dec = StreamDecoder(tok.decode)
    out = "".join(dec.push(t) for t in ids)
    assert out == "x"
    assert dec.flush() == tok.decode(ids)[1:]  # replacement characters, not silence


def test_stop_matcher_holds_back_possible_stops():
    m = StopMatcher(("STOP",))
    assert m.feed("abc S") == ("abc ", False)  # "S" may start "STOP"
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # it didn't
    assert m.feed("yyST") == ("yy", False)
    assert m.feed("OP and more") == ("", True)
    assert m.text == "abc STxyy"


def test_stop_matcher_without_stops_passes_everything():
    m = StopMatcher(())
    assert m.feed("a") == ("a", False) and m.finish() == ""


def test_eos_ids_come_from_the_folder(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    assert tok.eos_ids == (0,) and tok.eos_token == "<|endoftext|>"


def test_chat_template_is_compiled_once_per_tokenizer(tiny_tokenizer_dir, monkeypatch):
    """A server renders a chat per request: the template compiles on the first one only (and again only when the
    template itself changes)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tests.runtime_fixtures import CHATML

    tok = _tok(tiny_tokenizer_dir)
    tok.chat_template = CHATML
    compiled = []
    real = ImmutableSandboxedEnvironment.from_string
    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string",
                        lambda self, src, *a, **k: compiled.append(src) or real(self, src, *a, **k))
    msgs = [{"role": "user", "content": "hi"}]
    outs = {tok.apply_chat_template(msgs) for _ in range(5)}
    assert outs == {"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"} and compiled == [CHATML]
    tok.chat_template = CHATML.replace("assistant", "bot")
    assert tok.apply_chat_template(msgs).endswith("<|im_start|>bot\n") and len(compiled) == 2


def test_a_rendered_chat_gets_no_second_bos(sentencepiece_tokenizer_dir, tmp_path, monkeypatch):
    """A template that writes the BOS itself, on a tokenizer whose post-processor adds one (Llama's): the chat
    encodes with one BOS, token for token as HF's apply_chat_template(tokenize=True); a plain prompt keeps its BOS."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from edgelm.runtimes.base import Runtime

    folder = tmp_path / "tok"
    shutil.copytree(sentencepiece_tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}[assistant] {% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"},
            {"role": "user", "content": "and g?"}]
    hf = AutoTokenizer.from_pretrained(folder)
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    tok = TextTokenizer.from_folder(folder)
    text = tok.apply_chat_template(msgs)
    assert tok.encode(text, special=False) == want and want.count(hf.bos_token_id) == 1
    assert tok.encode("def f") == hf("def f")["input_ids"] and tok.encode("def f")[0] == hf.bos_token_id

    seen = []  # what Runtime.chat hands to generate
    monkeypatch.setattr(Runtime, "generate", lambda self, prompt, config=None, **kw: seen.append(prompt))
    rt = Runtime.__new__(Runtime)
    rt.tokenizer, rt.path = tok, folder
    rt.chat(msgs)
    assert seen == [want]
