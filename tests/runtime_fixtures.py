"""One tiny model on every backend: the HF folder (torch), its fp32 GGUF (llama.cpp), ONNX (onnx) and TVM (tvm).

Its greedy output is made to contain a 41-byte token (llama-cpp-python's detokenize drops tokens over 32 bytes)
and an emoji split over four byte tokens: embedding rows (tied with the lm_head) of tokens the model generates are
swapped with those tokens' rows. Swapping rows permutes the model exactly, so the new greedy output is the old one
with the swapped ids exchanged.
"""
from __future__ import annotations

from pathlib import Path

import pytest

LONG = "#" + "=" * 39 + "\n"  # 41 bytes, one token
EMOJI = "🙂"  # F0 9F 99 82: four ByteLevel byte tokens
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)


def _byte_token_ids(tok, text: str) -> list[int]:
    from tokenizers.pre_tokenizers import ByteLevel  # noqa: F401  (the alphabet below is ByteLevel's)

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = dict(zip(bs, map(chr, cs)))
    return [tok.convert_tokens_to_ids(byte_char[b]) for b in text.encode("utf-8")]


def _greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
    """(greedy ids, smallest top-1 minus top-2 logit margin along the way)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
    return out.sequences[0, len(prompt_ids):].tolist(), margin


@pytest.fixture(scope="session")
def rt_model(tmp_path_factory, tiny_tokenizer_dir) -> dict:
    """{"folder", "long_id", "emoji_ids", "prompt_ids", "greedy", "tokenizer"} for the permuted tiny model.

    Random weights with initializer_range 0.1 give a varied greedy output with clear top-1 margins (an untrained
    model at 0.02 repeats one token; a briefly trained one repeats a few), so that five generated ids can be swapped.
    """
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("rt-model")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_tokens([AddedToken(LONG, normalized=False, special=False)])
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    long_id = tok.convert_tokens_to_ids(LONG)
    emoji_ids = _byte_token_ids(tok, EMOJI)
    targets = [long_id, *emoji_ids]
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    for seed in range(20):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, initializer_range=0.1, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id)
        model = LlamaForCausalLM(cfg).eval()
        g, margin = _greedy(model, prompt_ids, 24)
        # five consecutive distinct generated ids, none in the prompt or among the targets
        starts = [i for i in range(len(g) - 4) if len(set(g[i : i + 5])) == 5
                  and not set(g[i : i + 5]) & (set(prompt_ids) | set(targets))]
        if margin > 0.05 and starts:
            break
    else:
        raise AssertionError("no seed gave a varied greedy output with clear margins")
    swap = dict(zip(g[starts[0] : starts[0] + 5], targets))
    swap.update({b: a for a, b in swap.items()})
    emb = model.get_input_embeddings().weight  # [V, H], tied with the lm_head
    with torch.no_grad():
        emb[list(swap)] = emb[list(swap.values())].clone()
    model.save_pretrained(out)
    expected = [swap.get(t, t) for t in g]
    got, _ = _greedy(LlamaForCausalLM.from_pretrained(out).eval(), prompt_ids, 24)
    assert got == expected
    return {"folder": out, "long_id": long_id, "emoji_ids": emoji_ids, "prompt_ids": prompt_ids, "greedy": got,
            "tokenizer": tok}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, rt_model, tiny_corpus) -> dict[str, Path]:
    """backend name -> what it opens: the HF folder, and its fp32 GGUF, ONNX and TVM artifacts."""
    from edgelm.artifact.api import export

    root = tmp_path_factory.mktemp("rt-artifacts")
    out = {"torch": rt_model["folder"]}
    for target, backend in (("gguf", "llamacpp"), ("onnx", "onnx"), ("tvm", "tvm")):
        export(model=str(rt_model["folder"]), target=target, quant="fp32", out=root / target,
               data=(str(tiny_corpus),), **CHECK)
        out[backend] = root / target
    return out


@pytest.fixture(scope="session")
def runtimes(artifacts):
    """backend name -> an open runtime (1 thread), closed at the end of the session."""
    from edgelm.runtimes.api import load

    rts = {name: load(path, runtime=name, threads=1) for name, path in artifacts.items()}
    yield rts
    for rt in rts.values():
        rt.close()
