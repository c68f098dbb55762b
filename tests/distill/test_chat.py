"""Chat kept through distillation: the teacher's answers (batched greedy, cached), the mixed stream, the measure."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from edgelm.data.corpus import Corpus, CorpusSpec
from edgelm.distill import chat
from edgelm.distill.api import distill
from edgelm.errors import EdgelmError
from edgelm.manifest import read_manifest
from edgelm.metrics import perplexity, score_answers
from edgelm.models.loader import load_model
from tests.conftest import run_cli
from tests.distill.test_trainer import _args

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_teacher(tiny_teacher, tmp_path_factory):
    """The tiny teacher with a ChatML template, as instruct models ship."""
    out = tmp_path_factory.mktemp("chat-teacher") / "teacher"
    shutil.copytree(tiny_teacher, out)
    (out / "edgelm.json").unlink()
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "cache"))


def test_render_closes_finished_answers_only(chat_teacher):
    tok = AutoTokenizer.from_pretrained(chat_teacher)
    head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render(tok, "hi") == head
    assert chat.render(tok, "hi", "yo") == head + "yo<|im_end|>\n"
    assert chat.render(tok, "hi", "yo", finished=False) == head + "yo"


def test_batched_generation_equals_one_at_a_time(chat_teacher):
    model, tok, _ = load_model(chat_teacher)
    prompts = ["Write a Python function f(x). Return x.", "Explain this:\n```python\nx = 1\n```", "hi"]
    batched = chat.generate(model, tok, prompts, max_new_tokens=12, batch_size=3)
    alone = [chat.generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == alone
    # greedy by hand for the first prompt: argmax of the next-token logits, 12 times
    ids = tok(chat.render(tok, prompts[0]), add_special_tokens=False)["input_ids"]
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[-12:]
    stop = chat._stop_ids(model, tok)
    cut = next((k for k, t in enumerate(new) if t in stop), None)
    assert batched[0] == (tok.decode(new[:cut], skip_special_tokens=True), cut is not None)


def test_teacher_answers_are_cached(chat_teacher, tiny_corpus, monkeypatch):
    model, tok, _ = load_model(chat_teacher)
    corpus = Corpus(CorpusSpec((str(tiny_corpus),)))
    first = chat.teacher_chat(model, tok, corpus, 6, 16)
    assert len(first) == 6 and all(a.instruction.key.split("::")[0] in {d.key for d in corpus.docs("train")}
                                   for a in first)
    calls = []
    monkeypatch.setattr(chat, "generate", lambda *a, **k: calls.append(a) or [])
    again = chat.teacher_chat(model, tok, corpus, 6, 16)
    assert again == first and not calls, "the second call reads the cache"
    monkeypatch.undo()
    longer = chat.teacher_chat(model, tok, corpus, 6, 20)  # another token limit is another key
    assert len(longer) == 6


def test_a_served_teacher_answers_once_bounded_and_keeps_what_it_got(proxy, rt_model, tiny_corpus, tmp_path):
    """--chat-teacher-url: the answers come from an OpenAI-compatible server (llama-cpp-python's on loopback, behind
    the fault proxy), at most ``concurrency`` in flight, cached by URL and model; a server that fails midway stops
    the run in one line and keeps what it answered, so the next run asks only for the rest."""
    model, tok, _ = load_model(rt_model["folder"])
    corpus = Corpus(CorpusSpec((str(tiny_corpus),)))
    url = proxy.url
    in_flight, peak, lock = [0], [0], threading.Lock()
    original = proxy.count

    def served(**kw):
        cache = chat.AnswerCache.served(url, tok, backoff=0.05, **kw)
        inner = cache._produce.args[0]  # the client: count the requests it has in flight
        ask = inner.chat_answer

        def counted(*a, **k):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            try:
                return ask(*a, **k)
            finally:
                with lock:
                    in_flight[0] -= 1

        inner.chat_answer = counted
        return cache

    got = chat.teacher_chat(model, tok, corpus, 5, 16, served=served(concurrency=2))
    assert len(got) == 5 and proxy.count - original == 5 and peak[0] == 2
    assert all(isinstance(a.text, str) and isinstance(a.finished, bool) for a in got)
    asked = proxy.count
    proxy.mode = "500"
    assert chat.teacher_chat(model, tok, corpus, 5, 16, served=served(concurrency=2)) == got, "read from the cache"
    assert proxy.count == asked
    proxy.mode = "pass"
    # another model name is another cache; the server fails (500, retried) after two answers
    proxy.fail_after = proxy.count + 2
    with pytest.raises(EdgelmError, match=r"no answer \(http_500\) after 2 of 5; those are cached"):
        chat.teacher_chat(model, tok, corpus, 5, 16, served=served(model="other", concurrency=1, retries=1))
    proxy.fail_after = None
    asked = proxy.count
    again = chat.teacher_chat(model, tok, corpus, 5, 16, served=served(model="other", concurrency=1))
    assert len(again) == 5 and proxy.count - asked == 3, "only the three missing answers are asked for"
    # distill takes the served answers (cached above: the server is down for it), logit KD from the local teacher
    proxy.mode = "500"
    res = distill(**_args(rt_model["folder"], tiny_corpus, tmp_path / "run", chat_mix=0.5, chat_examples=5,
                          chat_max_new_tokens=16, chat_teacher_url=url, max_steps=2, eval_every=0, ckpt_every=0))
    assert res.manifest["training"]["chat"] == {"mix": 0.5, "answers": 5, "teacher": url,
                                                "finished": sum(a.finished for a in got)}
    proxy.mode = "pass"


def test_mix_streams_is_deterministic_and_takes_its_share():
    def take(n):
        code = iter(np.zeros((10_000, 4), dtype=np.int64))
        talk = iter(np.ones((10_000, 4), dtype=np.int64))
        s = chat.MixedStream(code, talk, 0.25, seed=3)
        return np.stack([next(s) for _ in range(n)])[:, 0]

    a = take(4000)
    assert np.array_equal(a, take(4000))
    assert 0.22 < a.mean() < 0.28


def test_chat_stream_packs_every_token(chat_teacher):
    tok = AutoTokenizer.from_pretrained(chat_teacher)
    texts = [chat.render(tok, f"question {i}", f"answer {i} " * i) for i in range(1, 9)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    s = chat.ChatStream(texts, tok, 1, seed=0)
    assert s.tokens == sum(len(i) for i in ids)
    it = iter(s)
    epoch = [int(next(it)[0]) for _ in range(s.tokens)]
    assert sorted(epoch) == sorted(sum(ids, [])), "the first epoch is every conversation once"
    assert epoch != sum(ids, []), "shuffled"
    again = iter(chat.ChatStream(texts, tok, 1, seed=0))
    assert [int(next(again)[0]) for _ in range(s.tokens)] == epoch, "deterministic"


def test_mixed_stream_resumes_from_its_state(chat_teacher, tiny_corpus):
    from edgelm.data.corpus import TokenStream

    tok = AutoTokenizer.from_pretrained(chat_teacher)
    talk = chat.ChatStream([chat.render(tok, f"question {i}", f"answer {i} " * i) for i in range(1, 9)], tok, 16)

    def mixed(state=None):
        code = TokenStream(Corpus(CorpusSpec((str(tiny_corpus),))), tok, "train", 16, seed=1, shuffle_buffer=8,
                           loop=True)
        return chat.MixedStream(code.cursor(state and state["code"]), talk.cursor(state and state["chat"]), 0.4,
                                seed=2, state=state)

    ref = mixed()
    want = [next(ref) for _ in range(600)]
    cut = mixed()
    for _ in range(250):
        next(cut)
    assert cut.chat.epoch >= 1, "the chat stream has looped"
    resumed = mixed(cut.state())
    assert all(np.array_equal(next(resumed), w) for w in want[250:])


def test_chat_mix_trains_and_resumes_bit_identically(chat_teacher, tiny_corpus, tmp_path):
    kw = dict(chat_mix=0.5, chat_examples=8, chat_max_new_tokens=24, max_steps=8, ckpt_every=4, keep_ckpts=5)
    full = distill(**_args(chat_teacher, tiny_corpus, tmp_path / "full", **kw))
    m = read_manifest(full.student_dir)
    assert m["training"]["chat"]["mix"] == 0.5 and m["training"]["chat"]["answers"] == 8
    # a run killed after its step-4 checkpoint: the later checkpoint and the student are gone
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    shutil.rmtree(cut / "student")
    shutil.rmtree(cut / "checkpoints" / "step-0000008", ignore_errors=True)
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-0000004"]
    resumed = distill(**_args(chat_teacher, tiny_corpus, cut, resume=True, **kw))
    a, b = load_file(full.student_dir / "model.safetensors"), load_file(resumed.student_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    code_only = distill(**_args(chat_teacher, tiny_corpus, tmp_path / "code", **{**kw, "chat_mix": 0.0}))
    c = load_file(code_only.student_dir / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a), "the chat sequences changed what was trained"


def test_chat_eval_scores_against_the_teacher(chat_teacher, tiny_teacher, tiny_corpus):
    res = chat.chat_eval({"same": chat_teacher}, teacher=chat_teacher, data=(str(tiny_corpus),), n=5,
                         max_new_tokens=16)
    assert len(res.instructions) == 5 and all(i.kind == "write" for i in res.instructions)
    t, s = res.scores["teacher"], res.scores["same"]
    assert t.edit_similarity == 1.0
    assert [a.text for a in res.answers["same"]] == [a.text for a in res.answers["teacher"]]
    assert s == t, "the teacher scored as a student matches its own figures"
    assert 0 <= t.verified <= 1 and 0 <= t.tests[0] <= t.tests[1]
    model, tok, _ = load_model(chat_teacher)
    prompts = [tok(chat.render(tok, i.prompt), add_special_tokens=False)["input_ids"] for i in res.instructions]
    answers = [tok(a.text, add_special_tokens=False)["input_ids"] for a in res.answers["teacher"]]
    nll = n = 0
    for p, a in zip(prompts, answers):  # one sequence at a time, by hand
        if not a:
            continue
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
        nll -= float(sum(lp[len(p) - 1 + k, tok_id] for k, tok_id in enumerate(a)))
        n += len(a)
    assert t.answer_ppl == pytest.approx(perplexity(nll, n), rel=1e-5)
    assert score_answers(model, prompts, answers)[1] == n
    json.dumps(res.as_dict())


def test_chat_mix_without_a_chat_template_is_one_line(tiny_teacher, tiny_corpus, tmp_path):
    r = run_cli("distill", "--teacher", str(tiny_teacher), "--data", str(tiny_corpus), "--max-steps", "1",
                "--layers", "2", "--out", str(tmp_path / "x"), "--chat-mix", "0.2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--chat-mix needs a tokenizer with a chat template" in r.stderr.strip().splitlines()[-1]
    r = run_cli("distill", "--teacher", str(tiny_teacher), "--data", str(tiny_corpus), "--max-steps", "1",
                "--out", str(tmp_path / "y"), "--chat-mix", "1")
    assert r.returncode != 0 and "--chat-mix must be in [0, 1), got 1.0" in r.stderr
    assert not (tmp_path / "x" / "student").exists()


def test_cli_eval_chat(chat_teacher, tiny_corpus):
    r = run_cli("eval", str(chat_teacher), "--data", str(tiny_corpus), "--max-seqs", "2", "--chat", "3",
                "--teacher", str(chat_teacher), "--chat-max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["chat"]["instructions"] == 3 and out["chat"]["scores"]["model"] == out["chat"]["scores"]["teacher"]
    r = run_cli("eval", str(chat_teacher), "--data", str(tiny_corpus), "--chat", "3", "--chat-max-new-tokens", "2",
                "--teacher", str(chat_teacher))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "max_new_tokens >= 8" in r.stderr
