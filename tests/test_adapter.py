"""The residual adapter against a hand computation, its flat layout, and the hypernetworks."""

import math

import pytest
import torch
import torch.nn.functional as F

from meta_vqa.nets.adapter import ResidualAdapter, task_correct, task_losses
from meta_vqa.nets.hypernet import MLP, FiLMGenerator


def test_paper_parameter_count_and_layout():
    a = ResidualAdapter(768, 256)
    assert a.num_params == 394_240  # the paper: D = 394,240
    w = torch.arange(a.num_params, dtype=torch.float64)
    w1, w2, b1, b2 = a.split(w)
    assert w1.shape == (256, 768) and w2.shape == (768, 256) and b1.shape == (256,) and b2.shape == (768,)
    # row-major [vec(W1), vec(W2), b1, b2]
    assert w1[0, 1].item() == 1 and w1[1, 0].item() == 768
    assert w2[0, 0].item() == 196_608 and b1[0].item() == 393_216 and b2[-1].item() == 394_239
    torch.testing.assert_close(a.flatten(w1, w2, b1, b2), w)


def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    d, h = 4, 3
    a = ResidualAdapter(d, h)
    w = torch.randn(2, a.num_params, dtype=torch.float64)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    t = torch.randn(2, 3, d, dtype=torch.float64)
    logits = a(w, x, t)
    for b in range(2):
        w1, w2, b1, b2 = a.split(w[b])
        for n in range(5):
            hid = [
                max(
                    0.0,
                    sum(x[b, n, j].item() * w1[i, j].item() for j in range(d)) / math.sqrt(d) + b1[i].item(),
                )
                for i in range(h)
            ]
            y = [
                sum(hid[i] * w2[j, i].item() for i in range(h)) / math.sqrt(h)
                + b2[j].item()
                + x[b, n, j].item()
                for j in range(d)
            ]
            ny = math.sqrt(sum(v * v for v in y))
            for k in range(3):
                tk = t[b, k].tolist()
                nt = math.sqrt(sum(v * v for v in tk))
                expected = 100 * sum(yi * ti for yi, ti in zip(y, tk)) / (ny * nt)
                assert abs(logits[b, n, k].item() - expected) < 1e-9


def test_zero_weights_are_clip_zero_shot():
    torch.manual_seed(1)
    a = ResidualAdapter(8, 4)
    x, t = torch.randn(3, 6, 8), torch.randn(3, 5, 8)
    expected = 100 * F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)
    torch.testing.assert_close(a(torch.zeros(3, a.num_params), x, t), expected)


def test_masked_answers_never_predicted_and_losses_ignore_padding():
    a = ResidualAdapter(8, 4)
    w = torch.randn(2, a.num_params)
    x, t = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    amask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    logits = a(w, x, t, amask)
    assert (logits[0].argmax(-1) < 2).all()
    y = torch.randint(0, 2, (2, 6))
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    losses = task_losses(logits, y, mask)
    expected0 = F.cross_entropy(logits[0, :3], y[0, :3])
    torch.testing.assert_close(losses[0], expected0)
    correct, total = task_correct(logits, y, mask)
    assert total.tolist() == [3, 6]
    assert correct[0] == (logits[0, :3].argmax(-1) == y[0, :3]).sum()


def test_mlp_init_follows_the_paper():
    torch.manual_seed(0)
    m = MLP(128, [128, 128, 128], 20_000)
    out = m.layers[-1].weight
    assert abs(out.std().item() - 1 / math.sqrt(128)) < 0.01  # linear gain
    assert abs(m.layers[0].weight.std().item() - math.sqrt(2 / 128)) < 0.02  # ReLU gain
    assert all(layer.bias.abs().sum() == 0 for layer in m.layers)


def test_film_is_exactly_feature_wise_modulation():
    torch.manual_seed(0)
    a = ResidualAdapter(6, 5)
    film = FiLMGenerator(a, cond_dim=7, hidden=[8])
    cond = torch.randn(3, 7)
    # untrained: the zero-initialised predictor gives the shared weights
    torch.testing.assert_close(film(cond), film.w0.expand(3, -1))
    torch.nn.init.normal_(film.film.layers[-1].weight)
    w = film(cond)
    g1, be1, g2, be2 = torch.split(film.film(cond), film.sizes, dim=-1)
    x = torch.randn(3, 4, 6)
    w1, w2, b1, b2 = a.split(film.w0)
    pre = x @ w1.T / math.sqrt(6) + b1
    hid = torch.relu((1 + g1).unsqueeze(1) * pre + be1.unsqueeze(1))
    out = (1 + g2).unsqueeze(1) * (hid @ w2.T / math.sqrt(5) + b2) + be2.unsqueeze(1) + x
    torch.testing.assert_close(a.embed(w, x), F.normalize(out, dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("straight_through", [False, True])
def test_loss_grad_by_hand_equals_autograd(straight_through):
    """The first-order loss and weight gradient by hand: autograd's values, written into the given rows."""
    torch.manual_seed(0)
    ad = ResidualAdapter(12, 6, straight_through=straight_through)
    b, n, k = 4, 7, 5
    w = (0.5 * torch.randn(b, ad.num_params)).double()
    x, answers = torch.randn(b, n, 12).double(), torch.randn(b, k, 12).double()
    answer_mask = torch.ones(b, k, dtype=torch.bool)
    answer_mask[0, 3:] = False  # padded answers
    labels, mask = torch.randint(0, 3, (b, n)), torch.rand(b, n) > 0.3
    mask[1] = False  # a task without examples: loss and gradient 0
    wl = w.clone().requires_grad_()
    losses = task_losses(ad(wl, x, answers, answer_mask), labels, mask)
    (grad,) = torch.autograd.grad(losses.sum() / 3, wl)
    correct, _ = task_correct(ad(w, x, answers, answer_mask), labels, mask)
    buf = torch.full((b + 1, ad.num_params), 7.0, dtype=torch.double)
    l2, c2, g2 = ad.loss_grad(w, x, answers, answer_mask, labels, mask, divisor=3, out=buf[1:])
    torch.testing.assert_close(l2, losses.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(c2, correct) and g2.data_ptr() == buf[1].data_ptr() and (buf[0] == 7).all()
    assert (g2[1] == 0).all()
