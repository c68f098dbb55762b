from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelm.data.corpus import Corpus, CorpusSpec, TokenStream
from edgelm.errors import EdgelmError
from edgelm.models.loader import load_model
from edgelm.models.prune import (StudentSpec, build_student, choose_layers, count_params, head_importance,
                                 hidden_importance, layer_importance, mlp_neuron_importance, prune)


@pytest.fixture(scope="module")
def teacher_and_calib(tiny_teacher, tiny_corpus):
    model, tok, _ = load_model(tiny_teacher)
    seqs = TokenStream(Corpus(CorpusSpec((str(tiny_corpus),))), tok, "train", 64).take(8)
    return model, [torch.as_tensor(b) for b in np.array_split(seqs, 2)]


def test_full_prune_reproduces_the_teacher(teacher_and_calib):
    teacher, calib = teacher_and_calib
    n = teacher.config.num_hidden_layers
    student = prune(teacher, list(range(n)))
    with torch.no_grad():
        assert torch.equal(student(input_ids=calib[0]).logits, teacher(input_ids=calib[0]).logits)


def test_layer_prune_copies_the_kept_blocks(teacher_and_calib):
    teacher, calib = teacher_and_calib
    scores = layer_importance(teacher, calib)
    assert len(scores) == teacher.config.num_hidden_layers and all(0 <= s <= 2 for s in scores)
    keep = choose_layers(scores, 2)
    assert keep == sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:2])
    student = prune(teacher, keep)
    assert student.config.num_hidden_layers == 2
    for new, old in enumerate(keep):
        a = student.model.layers[new].self_attn.q_proj.weight
        b = teacher.model.layers[old].self_attn.q_proj.weight
        assert torch.equal(a, b)


def test_width_prune_keeps_the_strongest_neurons(teacher_and_calib):
    teacher, calib = teacher_and_calib
    scores = mlp_neuron_importance(teacher, calib)
    student = prune(teacher, list(range(teacher.config.num_hidden_layers)), 128, scores)
    top = torch.topk(scores[1], 128).indices.sort().values
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight[top])
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[1].mlp.down_proj.weight[:, top])
    assert count_params(student) < count_params(teacher)


def test_width_prune_beats_random_neuron_choice(teacher_and_calib):
    """Activation-magnitude pruning should hurt the teacher's loss less than dropping neurons at random."""
    from edgelm.metrics import score_lm

    teacher, calib = teacher_and_calib
    scores = mlp_neuron_importance(teacher, calib)
    seqs = torch.cat(calib).numpy()
    layers = list(range(teacher.config.num_hidden_layers))
    guided = score_lm(prune(teacher, layers, 96, scores), seqs).nll
    g = torch.Generator().manual_seed(0)
    rand = score_lm(prune(teacher, layers, 96, [torch.rand(len(s), generator=g, dtype=torch.float64) for s in scores]), seqs).nll
    assert guided < rand


def test_build_student_variants(teacher_and_calib):
    teacher, calib = teacher_and_calib
    s, info = build_student(teacher, StudentSpec(layers=2, intermediate_size=128), calib)
    assert (s.config.num_hidden_layers, s.config.intermediate_size) == (2, 128)
    assert info["init"] == "prune" and len(info["kept_layers"]) == 2
    r, info_r = build_student(teacher, StudentSpec(layers=2, intermediate_size=128, init="random"), calib)
    assert r.config.to_dict() == s.config.to_dict()
    assert not torch.equal(r.model.layers[0].mlp.up_proj.weight, s.model.layers[0].mlp.up_proj.weight)
    z, info_z = build_student(teacher, StudentSpec(zoo="nano"), calib)
    assert z.config.hidden_size == 256 and z.config.vocab_size == teacher.config.vocab_size
    from edgelm.registry import STUDENT_ZOO

    assert count_params(z) == STUDENT_ZOO.get("nano").params(teacher.config.vocab_size)


@pytest.mark.parametrize("spec, msg", [
    (StudentSpec(layers=0), "--layers must be between 1"),
    (StudentSpec(layers=99), "--layers must be between 1"),
    (StudentSpec(intermediate_size=100), "multiple of 32"),
    (StudentSpec(intermediate_size=4096), "multiple of 32 between"),
    (StudentSpec(zoo="huge"), "unknown student config 'huge'"),
    (StudentSpec(init="zeros"), "--init must be"),
    (StudentSpec(hidden_size=40), "--hidden-size must be a multiple of 32 between 32 and the teacher's 64"),
    (StudentSpec(hidden_size=128), "--hidden-size must be a multiple of 32"),
    (StudentSpec(heads=3), "--heads must be a multiple of the teacher's 2 KV heads, at most its 4"),
    (StudentSpec(heads=8), "--heads must be a multiple"),
])
def test_bad_student_specs(teacher_and_calib, spec, msg):
    teacher, calib = teacher_and_calib
    with pytest.raises(EdgelmError, match=msg):
        build_student(teacher, spec, calib)


def test_zoo_dimensions_suit_block_quantization():
    from edgelm.registry import STUDENT_ZOO

    for name, shape in STUDENT_ZOO.items():
        for dim in (shape.hidden_size, shape.intermediate_size, shape.hidden_size // shape.num_attention_heads):
            assert dim % 32 == 0, (name, dim)
        assert shape.intermediate_size % 256 == 0 and shape.hidden_size % 256 == 0, name


def test_full_width_plan_reproduces_the_teacher(teacher_and_calib):
    """Scores given but every width kept: the student is the teacher, logits bit for bit."""
    teacher, calib = teacher_and_calib
    c = teacher.config
    n = c.num_hidden_layers
    student = prune(teacher, list(range(n)), c.intermediate_size, mlp_neuron_importance(teacher, calib),
                    hidden_size=c.hidden_size, hidden_scores=hidden_importance(teacher, calib),
                    heads=c.num_attention_heads, head_scores=head_importance(teacher, calib))
    with torch.no_grad():
        assert torch.equal(student(input_ids=calib[0]).logits, teacher(input_ids=calib[0]).logits)


def test_hidden_and_head_prune_slice_every_weight(teacher_and_calib):
    """Hidden channels leave every matrix along the residual stream; heads leave q_proj rows and o_proj columns,
    evenly from each KV group; k/v and the head size stay."""
    teacher, calib = teacher_and_calib
    c = teacher.config  # hidden 64, 4 heads of 16, 2 KV heads
    hs, heads = hidden_importance(teacher, calib), head_importance(teacher, calib)
    assert hs.shape == (c.hidden_size,) and len(heads) == c.num_hidden_layers and heads[0].shape == (4,)
    student = prune(teacher, [0, 2], 128, mlp_neuron_importance(teacher, calib), hidden_size=32, hidden_scores=hs,
                    heads=2, head_scores=heads)
    sc = student.config
    assert (sc.hidden_size, sc.num_attention_heads, sc.num_key_value_heads, sc.head_dim) == (32, 2, 2, 16)
    ch = torch.topk(hs, 32).indices.sort().values
    t, s = teacher.model, student.model
    assert torch.equal(s.embed_tokens.weight, t.embed_tokens.weight[:, ch])
    assert torch.equal(s.norm.weight, t.norm.weight[ch])
    assert torch.equal(s.layers[1].input_layernorm.weight, t.layers[2].input_layernorm.weight[ch])
    assert torch.equal(s.layers[1].self_attn.k_proj.weight, t.layers[2].self_attn.k_proj.weight[:, ch])
    # one head from each group of two: the stronger
    g0, g1 = heads[2][:2], heads[2][2:]
    kept = [int(g0.argmax()), 2 + int(g1.argmax())]
    rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept])
    assert torch.equal(s.layers[1].self_attn.q_proj.weight, t.layers[2].self_attn.q_proj.weight[rows][:, ch])
    assert torch.equal(s.layers[1].self_attn.o_proj.weight, t.layers[2].self_attn.o_proj.weight[ch][:, rows])
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=calib[0]).logits).all()


def test_hidden_prune_beats_random_channel_choice(teacher_and_calib):
    from edgelm.metrics import score_lm

    teacher, calib = teacher_and_calib
    seqs = torch.cat(calib).numpy()
    layers = list(range(teacher.config.num_hidden_layers))
    guided = score_lm(prune(teacher, layers, hidden_size=48, hidden_scores=hidden_importance(teacher, calib)), seqs).nll
    g = torch.Generator().manual_seed(0)
    rand = score_lm(prune(teacher, layers, hidden_size=48,
                          hidden_scores=torch.rand(teacher.config.hidden_size, generator=g)), seqs).nll
    assert guided < rand


def test_build_student_prunes_width_everywhere(teacher_and_calib):
    teacher, calib = teacher_and_calib
    s, info = build_student(teacher, StudentSpec(hidden_size=32, heads=2, intermediate_size=96), calib)
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (4, 32, 2, 96)
    assert count_params(s) < count_params(teacher) / 2


@pytest.mark.parametrize("spec, msg", [
    (StudentSpec(hidden_size=512), r"hidden size of 512 is not divisible by 9 query heads.*none: change --hidden-size"),
    (StudentSpec(hidden_size=480), r"hidden size of 480 is not divisible by 9 query heads.*pick --heads from \[3, 6\]"),
])
def test_hidden_size_must_divide_by_the_heads(spec, msg):
    """transformers refuses to save a config whose hidden size the query heads don't divide: refused before work."""
    from types import SimpleNamespace

    smollm2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                              num_key_value_heads=3)
    with pytest.raises(EdgelmError, match=msg):
        spec.validate(smollm2)
    StudentSpec(hidden_size=480, heads=6).validate(smollm2)  # fine


def test_nope_flags_follow_the_kept_layers_and_gguf_names_a_pattern_it_cannot_carry():
    """SmolLM3 skips RoPE on every fourth layer; a depth-pruned student keeps each kept layer's flag (and computes
    with it), and GGUF, whose llama.cpp graph hard-codes the period, refuses the new pattern by name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgelm.models.archs import get_arch

    cfg = AutoConfig.for_model("smollm3", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=2, num_key_value_heads=1, pad_token_id=None)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg).eval()
    arch = get_arch("smollm3")
    assert arch.rope_layers(teacher.config.to_dict()) == (True, True, True, False)
    arch.gguf_check(teacher.config.to_dict())  # llama.cpp's own pattern: accepted
    student = prune(teacher, [0, 3])
    assert student.config.no_rope_layers == [1, 0]
    assert [bool(layer.self_attn.use_rope) for layer in student.model.layers] == [True, False]  # as it computes
    with pytest.raises(EdgelmError, match=r"llama.cpp's graph skips RoPE on every 4th layer, this model on layers "
                                          r"\[1\]; export to onnx or tvm"):
        arch.gguf_check(student.config.to_dict())


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=None,
                               tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_phi3_fused_projections_prune_as_their_parts():
    """Phi-3's qkv_proj and gate_up_proj stack the Llama block's projections: a Phi-3 pruned in heads, MLP neurons
    and hidden channels computes exactly what the same Llama (its fused weights split) pruned alike computes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    phi = _tiny("phi3", initializer_range=0.2)
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", **{k: getattr(phi.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "rms_norm_eps")},
        tie_word_embeddings=True)).eval()
    state, q, kv, inter = {}, 4 * 16, 2 * 16, 128
    for k, v in phi.state_dict().items():
        if k.endswith("qkv_proj.weight"):
            head = k[: -len("qkv_proj.weight")]
            state.update({head + "q_proj.weight": v[:q], head + "k_proj.weight": v[q:q + kv],
                          head + "v_proj.weight": v[q + kv:]})
        elif k.endswith("gate_up_proj.weight"):
            head = k[: -len("gate_up_proj.weight")]
            state.update({head + "gate_proj.weight": v[:inter], head + "up_proj.weight": v[inter:]})
        else:
            state[k] = v
    llama.load_state_dict(state, strict=False)
    llama.tie_weights()
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        assert torch.allclose(phi(ids).logits, llama(ids).logits, atol=1e-5)  # the same model
    g = torch.Generator().manual_seed(1)
    scores = dict(neuron_scores=[torch.rand(inter, generator=g) for _ in range(2)],
                  hidden_scores=torch.rand(64, generator=g), head_scores=[torch.rand(4, generator=g) for _ in range(2)])
    kw = dict(hidden_size=32, heads=2, **{k: v for k, v in scores.items() if k != "neuron_scores"})
    small_phi = prune(phi, [0, 1], 64, scores["neuron_scores"], **kw)
    small_llama = prune(llama, [0, 1], 64, scores["neuron_scores"], **kw)
    assert small_phi.model.layers[0].self_attn.qkv_proj.weight.shape == (2 * 16 + 2 * kv, 32)
    assert small_phi.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 64, 32)
    with torch.no_grad():
        assert torch.allclose(small_phi(ids).logits, small_llama(ids).logits, atol=1e-5)


def test_gemma_prunes_its_four_norms_and_keeps_its_embedding_scale():
    """Gemma 3's block has four norms and q/k norms; a narrower student scales its embeddings by sqrt(its hidden),
    which pruning makes up for (embedding rows times sqrt(old / new), the final norm's scale divided by it), so the
    kept channels of the scaled embeddings are the teacher's."""
    teacher = _tiny("gemma3_text", head_dim=16, initializer_range=0.2, layer_types=["sliding_attention",
                                                                                    "full_attention"])
    ids = torch.randint(0, 64, (1, 24))
    g = torch.Generator().manual_seed(1)
    hidden = torch.rand(64, generator=g)
    student = prune(teacher, [0, 1], hidden_size=32, hidden_scores=hidden)
    layer = student.model.layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        assert getattr(layer, name).weight.shape == (32,)
    assert layer.self_attn.q_norm.weight.shape == (16,)
    kept = torch.topk(hidden, 32).indices.sort().values
    scale = (64 / 32) ** 0.5
    assert torch.allclose(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, kept] * scale)
    with torch.no_grad():
        h_teacher = teacher.model.embed_tokens(ids)[..., kept]  # [1, T, 32], scaled by sqrt(64)
        h_student = student.model.embed_tokens(ids)  # scaled by sqrt(32), rows times sqrt(2)
        assert torch.allclose(h_student, h_teacher, atol=1e-5)
        assert torch.isfinite(student(ids).logits).all()
