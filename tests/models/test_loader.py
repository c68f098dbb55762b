from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from edgelm.errors import EdgelmError
from edgelm.models.builtin import BuiltinModel
from edgelm.models.loader import check_same_tokenizer, load_model, model_from_state, resolve
from edgelm.registry import TEACHERS
from tests.conftest import make_tiny_llama


def test_loads_a_folder(tiny_teacher):
    model, tok, src = load_model(tiny_teacher)
    assert src.kind == "folder" and src.sha256
    assert not model.training
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tok("x = 1")["input_ids"]])).logits
    assert out.shape[-1] == model.config.vocab_size


def test_missing_model_names_the_options(tmp_path):
    with pytest.raises(EdgelmError, match="not found.*smollm2-135m-instruct"):
        resolve(str(tmp_path / "none"))


def test_hub_id_is_recognised_without_network_access():
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, tiny_teacher):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_teacher, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EdgelmError, match="could not load .*corrupt"):
        load_model(bad)


def test_corrupt_gguf_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EdgelmError, match="could not read GGUF .*truncated or corrupt"):
        resolve(str(f))
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_missing_builtin_package_names_the_pip_command():
    TEACHERS.register("test-missing", BuiltinModel("edgelm_no_such_pkg", "x.gguf", "pip install no-such-pkg", "MIT", "t"))
    with pytest.raises(EdgelmError, match="install it with: pip install no-such-pkg"):
        resolve("test-missing")


def test_unsupported_architecture_lists_supported(tmp_path, tiny_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path)
    with pytest.raises(EdgelmError, match="'gpt2' model; supported architectures: gemma3_text, llama, mistral, phi3, "
                                          "qwen2, qwen3, smollm3"):
        load_model(tmp_path)


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_tokenizer_dir, tiny_corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train([str(p) for p in sorted(tiny_corpus.glob("*.py"))[:5]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<e>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<e>")
    with pytest.raises(EdgelmError, match="tokenizer mismatch"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), other, "other")
    check_same_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir),
                         AutoTokenizer.from_pretrained(tiny_tokenizer_dir), "same")


def test_tiny_llama_helper_roundtrip(tmp_path, tiny_tokenizer_dir):
    d = make_tiny_llama(tmp_path / "m", tiny_tokenizer_dir, layers=2)
    model, _, _ = load_model(d)
    assert model.config.num_hidden_layers == 2


def test_model_from_state_rebuilds_and_refuses_weights_that_do_not_fit(tiny_teacher):
    model, _, _ = load_model(tiny_teacher)
    cfg, state = model.config.to_dict(), model.state_dict()
    again = model_from_state(cfg, {k: v for k, v in state.items() if k != "lm_head.weight"}, what="x", fix="y")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())  # the tied head comes back too
    del state["model.norm.weight"]
    with pytest.raises(EdgelmError, match=r"^x does not fit its config \(missing \['model.norm.weight'\].*; y$"):
        model_from_state(cfg, state, what="x", fix="y")
