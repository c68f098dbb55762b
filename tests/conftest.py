"""Shared fixtures: a tiny tokenizer, tiny Llama teacher and tiny corpus, all built locally in seconds."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the tiny model on every backend (tests/runtimes, tests/bench); a real cloud on loopback (tests/coop, tests/app)
pytest_plugins = ["tests.runtime_fixtures", "tests.cloud_fixtures", "tests.tokenizer_fixtures"]

# Small, readable stdlib modules for the tiny corpus: enough files for every split.
STDLIB_FILES = 160


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m edgelm ARGS` and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def kill_when(args: list[str], path: Path, timeout: float = 300) -> None:
    """Run ``edgelm ARGS`` in a child, SIGKILL it as soon as ``path`` exists, and check it was killed mid-run."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgelm", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    from edgelm.data.corpus import stdlib_root

    out = tmp_path_factory.mktemp("corpus")
    files = sorted(p for p in stdlib_root().glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:STDLIB_FILES]
    for p in files:
        shutil.copy(p, out / p.name)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(tiny_corpus.glob("*.py"))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    """A SentencePiece BPE with byte fallback (as Llama 2 and Mistral 7B ship), trained by sentencepiece on the tiny
    corpus, written as the HF tokenizer.json those models have: the vocab in piece order, merges ranked by the piece
    they make, "▁" for spaces (legacy normalizer), BOS added. Its tokens equal sentencepiece's own (tested)."""
    from tests.tokenizer_fixtures import sentencepiece_llama

    return sentencepiece_llama(tmp_path_factory.mktemp("spm"), tiny_corpus)


def with_rope(model: Path, out: Path, rope: dict) -> Path:
    """A copy of ``model`` whose config.json sets ``rope_scaling`` as a hand edit would (no edgelm.json: no longer
    the run's output)."""
    import json

    shutil.copytree(model, out)
    (out / "edgelm.json").unlink(missing_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_scaling"] = rope
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, layers: int = 4, hidden: int = 64, inter: int = 256,
                    seed: int = 0, heads: int = 4, kv_heads: int = 2, vocab: int | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer_dir, tiny_corpus) -> Path:
    """A tiny Llama trained briefly (CE) on the tiny corpus, so it is better than chance and worth distilling."""
    from edgelm.distill.api import distill

    base = make_tiny_llama(tmp_path_factory.mktemp("tiny-init"), tiny_tokenizer_dir)
    run = tmp_path_factory.mktemp("tiny-teacher-run")
    res = distill(teacher=str(base), student=str(base), alpha=0.0, data=(str(tiny_corpus),), seq_len=64,
                  batch_size=8, max_steps=150, lr=3e-3, warmup_steps=10, eval_every=0, ckpt_every=0,
                  out=str(run), force=True, progress=False, eval_seqs=8, bf16="off")
    return res.student_dir


@pytest.fixture(scope="session")
def tiny_q_model(tmp_path_factory, tiny_tokenizer_dir, tiny_corpus) -> Path:
    """A tiny Llama whose rows fit every block size (hidden 256: llama.cpp K-quants need multiples of 256),
    trained briefly so that quantization error shows in perplexity."""
    from edgelm.distill.api import distill

    # vocab padded to 640 rows: onnxruntime-genai 0.18 builds wrong logits for 256 or 512 vocab rows at hidden 256
    # (test_parity_check_catches_a_broken_export); padded vocabs are common anyway
    base = make_tiny_llama(tmp_path_factory.mktemp("tinyq-init"), tiny_tokenizer_dir, layers=2, hidden=256, inter=512,
                           vocab=640)
    run = tmp_path_factory.mktemp("tinyq-run")
    res = distill(teacher=str(base), student=str(base), alpha=0.0, data=(str(tiny_corpus),), seq_len=64,
                  batch_size=8, max_steps=120, lr=2e-3, warmup_steps=10, eval_every=0, ckpt_every=0,
                  out=str(run), force=True, progress=False, eval_seqs=8, bf16="off")
    return res.student_dir


# Small calibration and check sizes for tests (GPTQ on the tiny model takes seconds).
CALIB = dict(calib_samples=16, calib_seqlen=128, eval_seqs=8, eval_seqlen=128)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, tiny_q_model, tiny_corpus):
    """get(preset, **options) -> (folder, QuantizeResult): `edgelm quantize` of tiny_q_model, once per session."""
    from edgelm.quant.api import quantize

    out: dict = {}
    root = tmp_path_factory.mktemp("quantized")

    def get(preset: str, **opts):
        key = (preset, tuple(sorted(opts.items())))
        if key not in out:
            folder = root / f"{preset}-{len(out)}"
            out[key] = (folder, quantize(model=tiny_q_model, quant=preset, out=folder, data=tiny_corpus, **CALIB, **opts))
        return out[key]

    return get
