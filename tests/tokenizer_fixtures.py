"""Tokenizers of the model families users bring, trained on the tiny corpus and written as those models ship them
(tokenizer.json, special tokens, chat template, the end-of-generation ids of their generation_config.json):

- Llama 3's byte-level BPE with its split regex, <|begin_of_text|> added, <|eot_id|> ending a turn;
- Qwen's (Qwen2, Qwen2.5, Qwen3): the same with digits split one by one, ChatML's <|im_start|>/<|im_end|>;
- Phi-4-mini's GPT-4o-style (o200k) split, <|user|> ... <|end|>;
- Gemma's SentencePiece BPE with byte fallback and no dummy prefix, <bos> added by the post-processor and also in
  the chat template (HF's apply_chat_template(tokenize=True) adds no second one), <start_of_turn>/<end_of_turn>;
- Llama 2's / Mistral 7B's SentencePiece BPE (``sentencepiece_llama``).

``FAMILIES`` names each one's fixture; tests/test_archs.py gives every arch's tiny model its family's tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# chat templates of the shape each family's own takes (their real ones add tools and dates around this)
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PHI4_CHAT = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
              "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
              "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
              "{% endif %}")


@dataclass(frozen=True)
class Family:
    """What a family's tokenizer folder holds beside its tokenizer.json."""

    chat_template: str
    bos: str | None  # the BOS token, added by the post-processor when set
    eos: str  # tokenizer_config's eos_token
    end_of_generation: tuple[str, ...]  # generation_config.json's eos_token_id, as tokens
    specials: tuple[str, ...]  # every special token, in id order after the learned vocab's


FAMILIES = {
    "llama3": Family(LLAMA3_CHAT, "<|begin_of_text|>", "<|eot_id|>", ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>")),
    "qwen": Family(CHATML, None, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"),
                   ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "gpt4o": Family(PHI4_CHAT, None, "<|endoftext|>", ("<|end|>", "<|endoftext|>"),
                    ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "gemma": Family(GEMMA_CHAT, "<bos>", "<eos>", ("<eos>", "<end_of_turn>"),
                    ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")),
}
SPLITS = {"llama3": LLAMA3_SPLIT, "qwen": QWEN_SPLIT, "gpt4o": GPT4O_SPLIT}


def _texts(corpus: Path, n: int = 80) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.py"))[:n]]


def byte_level_bpe(out: Path, corpus: Path, family: str, vocab_size: int = 600) -> Path:
    """A byte-level BPE with the family's split regex before ByteLevel (as Llama 3, Qwen and Phi-4-mini ship it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLITS[family]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(fam.specials), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(corpus), trainer)
    tok.add_special_tokens(list(fam.specials))
    if fam.bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                                                          special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos)
    return _save(fast, out, fam)


def _save(fast, out: Path, fam: Family) -> Path:
    fast.chat_template = fam.chat_template
    fast.save_pretrained(out)
    eog = [fast.convert_tokens_to_ids(t) for t in fam.end_of_generation]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eog}))  # read by make_tiny
    return out


def _spm_train(out: Path, corpus: Path, **options) -> "object":
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    text = out / "train.txt"
    text.write_text("\n".join(_texts(corpus)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spm"), vocab_size=600, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", max_sentence_length=1 << 20, minloglevel=2,
                                   **options)
    return spm.SentencePieceProcessor(model_file=str(out / "spm.model"))


def _spm_bpe(sp) -> "object":
    """sentencepiece's BPE as a tokenizers BPE: the vocab in piece order, merges ranked by the piece they make."""
    from tokenizers import Tokenizer, models

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = sorted((pid, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:]) for p, pid in vocab.items()
                    if sp.is_unknown(pid) + sp.is_control(pid) + sp.is_byte(pid) == 0
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    return Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>", fuse_unk=True,
                                byte_fallback=True))


def sentencepiece_llama(out: Path, corpus: Path) -> Path:
    """Llama 2's / Mistral 7B's: "▁" prepended to the text (the dummy prefix), BOS added, <unk> at 0."""
    from tokenizers import decoders, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = _spm_train(out, corpus, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    tok = _spm_bpe(sp)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    folder = out / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    (folder / "spm.model").write_bytes((out / "spm.model").read_bytes())  # for the test that compares the two
    return folder


def sentencepiece_gemma(out: Path, corpus: Path) -> Path:
    """Gemma's: <pad> <eos> <bos> <unk> first, no dummy prefix, <start_of_turn>/<end_of_turn> among the pieces,
    spaces as "▁" with a Split on " " (Gemma 3's tokenizer.json), <bos> added by the post-processor."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES["gemma"]
    sp = _spm_train(out, corpus, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                    bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
                    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    tok = _spm_bpe(sp)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam.specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    folder = _save(fast, out / "hf", fam)
    (folder / "spm.model").write_bytes((out / "spm.model").read_bytes())
    return folder


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    return byte_level_bpe(tmp_path_factory.mktemp("tok-llama3"), tiny_corpus, "llama3")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    return byte_level_bpe(tmp_path_factory.mktemp("tok-qwen"), tiny_corpus, "qwen")


@pytest.fixture(scope="session")
def gpt4o_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    return byte_level_bpe(tmp_path_factory.mktemp("tok-gpt4o"), tiny_corpus, "gpt4o")


@pytest.fixture(scope="session")
def gemma_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    return sentencepiece_gemma(tmp_path_factory.mktemp("tok-gemma"), tiny_corpus)
