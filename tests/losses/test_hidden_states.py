"""Hidden-state losses equal a float64 reference written here from their definitions, in value and
in gradient (student states and projection weights); token normalization over micro-batches is
exact; the decoder returns the states after the chosen layers, also under activation checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from kdtune.errors import KDTuneError
from kdtune.losses import CosineHiddenStateLoss, MSEHiddenStateLoss, NormalizedMSEHiddenStateLoss, uniform_layer_map
from kdtune.models import TransformerDecoder
from kdtune.models.args import ModelArgs

B, S, D_S, D_T = 2, 7, 6, 10


def args(layers, width):
    return ModelArgs(model_type="qwen2", vocab_size=50, hidden_size=width, intermediate_size=2 * width,
                     num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=width // 2, norm_eps=1e-6,
                     rope_theta=1e4, tie_word_embeddings=True)


def reference(kind, student_states, teacher_states, weights, labels, num_tokens):
    keep = labels.reshape(-1) != -100
    total = 0
    for s, t, w in zip(student_states, teacher_states, weights):
        p = s.reshape(-1, D_S)[keep] @ w.T
        t = t.reshape(-1, D_T)[keep]
        if kind is MSEHiddenStateLoss:
            d = ((p - t) ** 2).mean(-1)
        elif kind is NormalizedMSEHiddenStateLoss:
            d = ((p - t) ** 2).sum(-1) / (t ** 2).sum(-1)
        else:
            d = 1 - (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))
        total = total + d.sum()
    return total / (num_tokens * len(student_states))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, S, D_S, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(B, S, D_T, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = torch.randint(0, 50, (B, S), generator=g)
    labels[0, :3] = -100
    return student, teacher, labels


@pytest.mark.parametrize("kind", [MSEHiddenStateLoss, NormalizedMSEHiddenStateLoss, CosineHiddenStateLoss])
def test_value_and_gradients_equal_the_float64_reference(kind):
    loss = kind(student=args(2, D_S), teacher=args(4, D_T), layers=[[0, 1], [1, 3]]).double()
    g = torch.Generator().manual_seed(1)
    for linear in loss.projections:  # not the identity start: a real gradient through the projection
        linear.weight.data = torch.randn(D_T, D_S, generator=g, dtype=torch.float64)
    student, teacher, labels = inputs()
    value = loss(student, teacher, labels, num_tokens=20)
    weights = [linear.weight for linear in loss.projections]
    want = reference(kind, student, teacher, weights, labels, 20)
    # The loss math runs in float32 (as the logit losses'), so float32 agreement is the bar.
    torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)
    got = torch.autograd.grad(value, [*student, *weights])
    expected = torch.autograd.grad(want, [*student, *weights])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batches_normalized_by_the_step_token_count_add_up_to_the_batch():
    loss = CosineHiddenStateLoss(student=args(2, D_S), teacher=args(4, D_T))
    student, teacher, labels = inputs(2)
    total = int((labels != -100).sum())
    whole = loss([s.float() for s in student], [t.float() for t in teacher], labels, num_tokens=total)
    parts = sum(loss([s[i: i + 1].float() for s in student], [t[i: i + 1].float() for t in teacher], labels[i: i + 1],
                     num_tokens=total) for i in range(B))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def test_layer_maps_and_projection_start():
    assert uniform_layer_map(15, 30)[:3] == [(0, 1), (1, 3), (2, 5)] and uniform_layer_map(15, 30)[-1] == (14, 29)
    assert uniform_layer_map(2, 3) == [(0, 0), (1, 2)]
    same = MSEHiddenStateLoss(student=args(2, 8), teacher=args(3, 8), projection="linear", shared_projection=True)
    assert len(same.projections) == 1 and torch.equal(same.projections[0].weight, torch.eye(8))
    assert MSEHiddenStateLoss(student=args(2, 8), teacher=args(3, 8), projection="none").projections is None
    with pytest.raises(KDTuneError, match="projection: none needs equal widths"):
        MSEHiddenStateLoss(student=args(2, 6), teacher=args(3, 8), projection="none")
    with pytest.raises(KDTuneError, match=r"layers: \[2, 0\] names no layer pair"):
        MSEHiddenStateLoss(student=args(2, 6), teacher=args(3, 8), layers=[[2, 0]])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_decoder_returns_the_states_after_the_chosen_layers(checkpointing):
    torch.manual_seed(0)
    model = TransformerDecoder(args(3, 8)).train()
    model.enable_activation_checkpointing(checkpointing)
    tokens = torch.randint(0, 50, (2, 5))
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o)) for i, layer in
             enumerate(model.layers)]
    hidden, states = model(tokens, return_hidden=True, return_layers=[2, 0, -1])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(states[0], seen[2])
    torch.testing.assert_close(states[1], seen[0])
    torch.testing.assert_close(states[2], model.embed_tokens(tokens))
    torch.testing.assert_close(hidden, model(tokens, return_hidden=True))
    states[1].sum().backward()  # the states keep their autograd history
    assert model.layers[0].mlp.down_proj.weight.grad is not None and model.layers[2].mlp.down_proj.weight.grad is None
