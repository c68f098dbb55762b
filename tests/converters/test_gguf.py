"""GGUF converter: GPTQ codes land in Q4_0/Q4_1/Q8_0 blocks without re-rounding; tokenizer; llama.cpp fallbacks."""
from __future__ import annotations

import os

import numpy as np
import pytest

from edgelm.converters.gguf import NameMap, find_fallbacks, llamacpp_quantize, read_types, write_gguf
from edgelm.converters.source import read_source
from edgelm.errors import EdgelmError


def _write(folder, path):
    from transformers import AutoTokenizer

    src = read_source(folder)
    write_gguf(src, AutoTokenizer.from_pretrained(folder), path, float_type="F32")
    return src


def _gguf_weights(path) -> dict[str, np.ndarray]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type.name) for t in r.tensors}


@pytest.mark.parametrize("preset, opts, qtype", [
    ("gptq-int4-g32", {}, "Q4_0"),
    ("gptq-int4-g128", {}, "Q4_0"),  # one scale repeated over 4 blocks
    ("gptq-int8", {}, "Q8_0"),
    ("int4-g32", {"asym": True}, "Q4_1"),
])
def test_gptq_weights_are_packed_without_rerounding(preset, opts, qtype, quantized, tmp_path):
    from edgelm.models.archs import get_arch

    folder, _ = quantized(preset, **opts)
    src = _write(folder, tmp_path / "m.gguf")
    got = _gguf_weights(tmp_path / "m.gguf")
    arch = get_arch(src.config["model_type"])
    names = NameMap(arch, src.config["num_hidden_layers"])
    for name, ql in src.qlinears.items():
        gname = names(name + ".weight")
        w, t = got[gname]
        assert t == qtype
        ref = ql.dequantize().numpy()  # what PyTorch computes with, [out, in]
        ref = arch.permute_rows(ref, gname, src.config["num_attention_heads"], src.config["num_key_value_heads"])
        if qtype == "Q4_1":  # d*q + m, with m = -d*z stored in fp16
            np.testing.assert_allclose(w, ref, rtol=0, atol=float(np.abs(ref).max()) * 2**-10)
        else:
            assert np.array_equal(w, ref), f"{gname}: GGUF values differ from GPTQ's"


def test_tokenization_matches_hf(tiny_q_model, tmp_path):
    from edgelm.runtimes.llamacpp import LlamaCppRuntime
    from transformers import AutoTokenizer

    _write(tiny_q_model, tmp_path / "m.gguf")
    tok = AutoTokenizer.from_pretrained(tiny_q_model)
    rt = LlamaCppRuntime(tmp_path / "m.gguf", context=512)
    texts = [
        "def f(x):\n    return x  +  1\n",  # code; a whitespace run before '+'
        "if a:\n        b()\n\n\n    c = {'k': [1, 2]}\t# tab\r\n",
        "naïve café — 日本語 🙂 Ωμέγα",  # multi-byte
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # special tokens
        "   leading and trailing   ",
        "x" * 300,
    ]
    for t in texts:
        assert rt.native_tokenize(t) == tok.encode(t, add_special_tokens=False), repr(t)
    assert rt.llm.token_eos() == tok.eos_token_id


def test_llamacpp_fallback_is_detected(tiny_teacher, tmp_path):
    """Rows of 64 don't fit K-quant blocks of 256: llama.cpp falls back silently; we list every such tensor."""
    _write(tiny_teacher, tmp_path / "f32.gguf")
    llamacpp_quantize(tmp_path / "f32.gguf", tmp_path / "q.gguf", "Q4_K_M")
    fb = find_fallbacks(tmp_path / "q.gguf", "Q4_K_M")
    assert fb and all(f["type"] not in ("Q4_K", "Q6_K") for f in fb)
    attn_q = [f for f in fb if f["tensor"].endswith("attn_q.weight")]
    assert len(attn_q) == 4 and attn_q[0]["row"] == 64  # every layer's q projection
    # Q8_0 has 32-element blocks: no fallback at hidden 64
    llamacpp_quantize(tmp_path / "f32.gguf", tmp_path / "q8.gguf", "Q8_0")
    assert find_fallbacks(tmp_path / "q8.gguf", "Q8_0") == []


def test_truncated_gguf_is_a_clear_error(tiny_q_model, tmp_path):
    from edgelm.runtimes.llamacpp import LlamaCppRuntime

    p = tmp_path / "m.gguf"
    _write(tiny_q_model, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgelmError, match="truncated"):
        read_types(p)
    with pytest.raises(EdgelmError, match="corrupt or truncated"):
        LlamaCppRuntime(p)


def test_llama3_split_regex_tokenizes_like_hf(tmp_path, tiny_corpus):
    """A byte-level BPE behind Llama 3's split regex (as Meta's tokenizer.json has it) is written with llama.cpp's
    `llama-bpe` pre-tokenizer, and llama.cpp then splits and merges exactly as HF does."""
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from edgelm.converters.gguf import SPLIT_REGEX_PRE
    from edgelm.runtimes.llamacpp import LlamaCppRuntime
    from tests.conftest import make_tiny_llama

    llama3 = next(r for r, name in SPLIT_REGEX_PRE.items() if name == "llama-bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(llama3), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(p) for p in sorted(tiny_corpus.glob("*.py"))[:40]],
              trainers.BpeTrainer(vocab_size=600, special_tokens=["<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>").save_pretrained(tmp_path / "tok")
    folder = make_tiny_llama(tmp_path / "m", tmp_path / "tok", layers=1, hidden=64, inter=128, vocab=640)
    hf = AutoTokenizer.from_pretrained(folder)
    _write(folder, tmp_path / "m.gguf")
    pre = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[-1]).decode() == "llama-bpe"
    rt = LlamaCppRuntime(tmp_path / "m.gguf", context=512)
    try:
        for t in _texts(tiny_corpus):
            assert rt.native_tokenize(t) == hf.encode(t, add_special_tokens=False), repr(t[:80])
    finally:
        rt.close()


def test_sentencepiece_tokenizer_equals_sentencepiece(sentencepiece_tokenizer_dir, tiny_corpus):
    """The fixture's HF tokenizer is a faithful SentencePiece BPE: its ids equal sentencepiece's on code and text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_tokenizer_dir / "spm.model"))
    hf = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    for t in _texts(tiny_corpus):
        assert hf.encode(t, add_special_tokens=False) == sp.encode(t), repr(t[:80])
    assert hf.encode("a")[0] == hf.bos_token_id  # adds BOS, as Llama 2 and Mistral 7B do


def test_sentencepiece_bpe_is_llamas_vocab_and_tokenizes_like_hf(sentencepiece_tokenizer_dir, tiny_corpus, tmp_path):
    """A SentencePiece BPE goes to llama.cpp's "llama" vocabulary (scores, byte tokens, space prefix), and llama.cpp
    then tokenizes exactly as HF does, BOS included."""
    import gguf
    from transformers import AutoTokenizer

    from edgelm.runtimes.llamacpp import LlamaCppRuntime
    from tests.conftest import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m", sentencepiece_tokenizer_dir, layers=1, hidden=64, inter=128, vocab=640)
    hf = AutoTokenizer.from_pretrained(folder)
    _write(folder, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    assert types.count(int(gguf.TokenType.BYTE)) == 256 and types[0] == int(gguf.TokenType.UNKNOWN)
    rt = LlamaCppRuntime(tmp_path / "m.gguf", context=512)
    try:
        for t in _texts(tiny_corpus):
            assert rt.native_tokenize(t) == hf.encode(t, add_special_tokens=False), repr(t[:80])
        assert rt.llm.tokenize(b"def f():", add_bos=True) == hf.encode("def f():")  # BOS, as HF adds it
    finally:
        rt.close()


def _texts(tiny_corpus) -> list[str]:
    """Code from the corpus, and text that exercises whitespace runs, digits, bytes outside the vocab and CRLF."""
    return [p.read_text(encoding="utf-8")[:3000] for p in sorted(tiny_corpus.glob("*.py"))[-6:]] + [
        "x  +  1\n\n\n    return  a\t\tb", "12345678 3.14159 1,000,000", "naïve café ½ Ⅻ 🙂 日本語",
        "it's we'll I'M they'VE", "   leading\r\n\r\ntrailing   ", "a"]


def test_imatrix_is_read_by_llama_quantize(tiny_q_model, tiny_corpus, tmp_path):
    """edgelm's importance matrix (GGUF imatrix format) is loaded whole by llama.cpp's own tool, and changes what
    it writes."""
    import shutil
    import sys
    from pathlib import Path

    from edgelm.artifact.api import export

    if not (shutil.which("llama-quantize") or (Path(sys.executable).parent / "llama-quantize").is_file()):
        why = "llama.cpp's llama-quantize tool is absent; `make llama-quantize` builds it"
        if os.environ.get("CI"):  # `make test` builds it, so under CI its absence is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    kw = dict(target="gguf", data=(str(tiny_corpus),), calib_samples=8, calib_seqlen=64, eval_seqs=4, eval_seqlen=64)
    with_im = export(model=tiny_q_model, quant="llamacpp-q4_k_m", imatrix=True, out=tmp_path / "im", **kw).manifest
    plain = export(model=tiny_q_model, quant="llamacpp-q4_k_m", out=tmp_path / "plain", **kw).manifest
    assert with_im["preset"]["name"] == "llamacpp-q4_k_m+imatrix" and with_im["preset"]["imatrix"]
    assert with_im["source"]["imatrix"]["tensors"] == 2 * 7 + 1  # 14 linears and the tied output
    assert with_im["imatrix_entries_loaded"] == 2 * 7 + 1
    assert with_im["parity"]["passed"] and with_im["tensor_types"] == plain["tensor_types"]
    assert (tmp_path / "im/model.gguf").read_bytes() != (tmp_path / "plain/model.gguf").read_bytes()


def test_imatrix_without_the_tool_is_one_line(tiny_q_model, tmp_path, monkeypatch):
    import shutil

    from edgelm.artifact.api import export

    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(EdgelmError, match="needs llama.cpp's llama-quantize tool .*make llama-quantize"):
        export(model=tiny_q_model, target="gguf", quant="llamacpp-q4_k_m", imatrix=True, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target, rope, error", [
    *((t, {"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' changes its frequencies with the sequence "
       "length") for t in ("gguf", "onnx", "tvm")),
])
def test_a_rope_the_target_cannot_carry_is_refused_before_any_work(tiny_q_model, tmp_path, target, rope, error,
                                                                    monkeypatch):
    """From the config alone, before a quantized preset quantizes anything."""
    from edgelm.artifact.api import export
    from edgelm.quant import api as quant_api
    from tests.conftest import with_rope

    src = with_rope(tiny_q_model, tmp_path / "scaled", rope)
    monkeypatch.setattr(quant_api, "quantize_to_folder", lambda *a, **k: pytest.fail("quantized before refusing"))
    for quant in ("fp32", "int4-g32"):
        with pytest.raises(EdgelmError, match=error):
            export(model=str(src), target=target, quant=quant, out=tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_llama3_rope_is_llamacpps_frequency_table(tiny_q_model, tmp_path):
    """Llama 3.1's scaling reaches llama.cpp as its rope_freqs tensor: each frequency's divisor, transformers' own."""
    import json

    from tests.conftest import with_rope

    src = with_rope(tiny_q_model, tmp_path / "llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32})
    cfg = json.loads((src / "config.json").read_text())
    _write(src, tmp_path / "m.gguf")
    freqs, qtype = _gguf_weights(tmp_path / "m.gguf")["rope_freqs.weight"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert qtype == "F32" and freqs.shape == (head_dim // 2,)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0 and np.all(np.diff(freqs) >= 0)  # high frequencies kept, low scaled


def test_yarn_reaches_llamacpp_as_its_table_and_attention_factor(tiny_q_model, tmp_path):
    """YaRN (Qwen2.5's long-context configs): transformers' frequencies as llama.cpp's rope_freqs table and its
    cos/sin scale (0.1 ln 4 + 1 = 1.1386) as rope.scaling.attn_factor: llama.cpp computes what PyTorch does."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    import edgelm
    from tests.conftest import with_rope

    src = with_rope(tiny_q_model, tmp_path / "yarn", {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 128})
    _write(src, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert float(fields["llama.rope.scaling.attn_factor"].parts[-1][0]) == pytest.approx(0.1 * np.log(4) + 1, 1e-6)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 500, 200)]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor([ids])).logits[0].numpy()
    with edgelm.load(tmp_path / "m.gguf", threads=1) as rt:
        np.testing.assert_allclose(rt.logits(ids), ref, atol=0.05)  # past the original 128 positions too


@pytest.mark.parametrize("head_dim", [96, 128])
def test_real_head_sizes_export_with_parity(tiny_tokenizer_dir, tiny_corpus, tmp_path, head_dim):
    """Phi-3's 96 and Llama 3 8B's / Qwen's / Mistral's 128: head_dim ** -0.5 * head_dim ** 0.5 is not exactly 1.0 in
    floats for them, which once refused every such model ("its attention scale ... is not llama.cpp's")."""
    from edgelm.artifact.api import export
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "m", tiny_tokenizer_dir, layers=1, hidden=2 * head_dim, inter=128, heads=2,
                            kv_heads=1)
    m = export(model=str(model), target="gguf", quant="fp32", out=tmp_path / "gguf", data=(str(tiny_corpus),),
               eval_seqs=2, eval_seqlen=32, prompts=2, new_tokens=8).manifest
    assert m["parity"]["passed"] and m["parity"]["greedy_identical"] == 2
