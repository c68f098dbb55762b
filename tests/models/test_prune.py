from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelm.data.corpus import Corpus, CorpusSpec, TokenStream
from edgelm.errors import EdgelmError
from edgelm.models.loader import load_model
from edgelm.models.prune import (StudentSpec, build_student, choose_layers, count_params, layer_importance,
                                 mlp_neuron_importance, prune)


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
