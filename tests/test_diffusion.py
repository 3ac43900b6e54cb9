"""Identities of the diffusion pieces: closed-form noising, samplers, CFG and combined guidance, HyperCLIP loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from meta_vqa.diffusion.guidance import cfg_eps, classifier_eps, guided_eps_fn
from meta_vqa.diffusion.schedule import add_noise, alphas_cumprod, make_scheduler, sample
from meta_vqa.nets.denoiser import LatentDenoiser, sinusoidal_embedding
from meta_vqa.nets.weight_encoder import WeightEncoder, contrastive_loss


def test_cosine_schedule_matches_the_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    abar = torch.tensor(betas, dtype=torch.float64).neg().add(1).cumprod(0)
    torch.testing.assert_close(alphas_cumprod(T), abar, rtol=1e-5, atol=1e-7)


def test_add_noise_equals_closed_form_and_diffusers():
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 5), torch.randn(6, 5)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    ab = alphas_cumprod()
    ours = add_noise(x0, eps, t, ab)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(ab[ti]) * x0[i] + math.sqrt(1 - ab[ti]) * eps[i]
        torch.testing.assert_close(ours[i], expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, make_scheduler("ddpm").add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, steps", [("ddim", 50), ("ddim", 1000), ("dpm", 20)])
def test_sampler_with_oracle_noise_recovers_x0(kind, steps):
    """If ε(x_t, t) is the true noise of a fixed x0, deterministic samplers land on x0."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 8)
    ab = alphas_cumprod()

    def oracle(x, t):
        a = ab[int(t)].float()
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample(oracle, x0.shape, kind, steps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=1e-3)


def test_ddpm_with_oracle_noise_concentrates_on_x0():
    torch.manual_seed(0)
    x0 = torch.randn(256, 2)
    ab = alphas_cumprod()

    def oracle(x, t):
        a = ab[int(t)].float()
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample(oracle, x0.shape, "ddpm", 1000, generator=torch.Generator().manual_seed(1))
    assert (out - x0).abs().max() < 1e-2


def _model():
    torch.manual_seed(0)
    return LatentDenoiser(latent_dim=6, cond_dim=5, time_dim=10, width=16)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cfg_gamma_zero_and_one_are_the_unconditional_and_conditional_samples(kind):
    model = _model()
    cond = torch.randn(3, 5)
    null = torch.zeros_like(cond)

    def run(eps_fn):
        return sample(eps_fn, (3, 6), kind, 20, generator=torch.Generator().manual_seed(7))

    plain_uncond = run(lambda x, t: model(x, t.expand(3), null))
    plain_cond = run(lambda x, t: model(x, t.expand(3), cond))
    assert torch.equal(run(guided_eps_fn(model, cond, 0.0)), plain_uncond)
    assert torch.equal(run(guided_eps_fn(model, cond, 1.0)), plain_cond)
    assert not torch.equal(plain_uncond, plain_cond)


def test_cfg_interpolates_and_extrapolates():
    model = _model()
    x, cond, t = torch.randn(3, 6), torch.randn(3, 5), torch.tensor(17)
    e0, e1 = model(x, t.expand(3), torch.zeros_like(cond)), model(x, t.expand(3), cond)
    torch.testing.assert_close(cfg_eps(model, x, t, cond, 1.5), -0.5 * e0 + 1.5 * e1, rtol=1e-5, atol=1e-6)


def test_combined_guidance_with_zero_classifier_scale_is_plain_cfg():
    model = _model()
    cond = torch.randn(3, 5)
    ab = alphas_cumprod()
    score = lambda x0: -(x0**2).sum(-1)  # noqa: E731

    def run(eps_fn):
        return sample(eps_fn, (3, 6), "ddim", 10, generator=torch.Generator().manual_seed(3))

    plain = run(guided_eps_fn(model, cond, 2.0))
    assert torch.equal(run(guided_eps_fn(model, cond, 2.0, ab, score, 0.0)), plain)
    assert not torch.equal(run(guided_eps_fn(model, cond, 2.0, ab, score, 0.1)), plain)


def test_classifier_guidance_pulls_samples_towards_high_scores():
    """An oracle denoiser aims at x0 = a; a score peaked at b pulls the sample from a towards b."""
    torch.manual_seed(0)
    a_target, b_target = torch.randn(4, 8), torch.randn(4, 8)
    ab = alphas_cumprod()

    def oracle(x, t, cond):
        a = ab[int(t[0])].float()
        return (x - a.sqrt() * a_target) / (1 - a).sqrt()

    score = lambda x0: -((x0 - b_target) ** 2).sum(-1) / 2  # noqa: E731
    cond = torch.zeros(4, 1)

    def run(scale):
        fn = guided_eps_fn(oracle, cond, 1.0, ab, score, scale)
        return sample(fn, (4, 8), "ddim", 50, generator=torch.Generator().manual_seed(0))

    plain, guided = run(0.0), run(0.5)
    torch.testing.assert_close(plain, a_target, rtol=1e-3, atol=1e-3)
    assert (guided - b_target).norm() < 0.6 * (plain - b_target).norm()


def test_classifier_term_moves_the_x0_estimate_by_scale_times_gradient():
    ab = alphas_cumprod()
    x, eps = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor(100)
    a = ab[100].float()
    out = classifier_eps(eps, x, t, ab, lambda x0: -(x0**2).sum(-1) / 2, scale=0.5)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    x0_new = (x - (1 - a).sqrt() * out) / a.sqrt()
    torch.testing.assert_close(x0_new, x0 + 0.5 * (-x0), rtol=1e-4, atol=1e-5)


def test_denoiser_has_the_papers_parameter_count_and_embedding():
    m = LatentDenoiser()
    assert sum(p.numel() for p in m.parameters()) == 161_152
    emb = sinusoidal_embedding(torch.tensor([3.0]), 100)
    f1 = math.exp(-math.log(1e4) / 50)
    assert abs(emb[0, 0].item() - math.cos(3.0)) < 1e-6 and abs(emb[0, 1].item() - math.cos(3 * f1)) < 1e-6
    assert abs(emb[0, 50].item() - math.sin(3.0)) < 1e-6 and abs(emb[0, 51].item() - math.sin(3 * f1)) < 1e-6


def test_standardized_condition_and_learned_null_embedding():
    torch.manual_seed(0)
    m = LatentDenoiser(latent_dim=3, cond_dim=4, time_dim=6, width=8, standardize_condition=True)
    questions = torch.randn(20, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 5.0
    m.set_condition_stats(questions)
    q = questions[:3]
    torch.testing.assert_close(m.condition(q), (q - questions.mean(0)) / questions.std(0))
    with torch.no_grad():
        m.null_cond.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]))
    cond = torch.cat([q[:1], torch.zeros(1, 4)])  # the zero vector is the null condition
    torch.testing.assert_close(m.condition(cond)[1], m.null_cond.detach())
    # the null embedding is learned: gradients reach it through the null rows only
    m(torch.randn(2, 3), torch.tensor([5, 7]), cond).sum().backward()
    assert m.null_cond.grad is not None and m.null_cond.grad.abs().sum() > 0
    # off (the default, the authors'): the raw embedding, and no extra parameters
    assert LatentDenoiser(3, 4, 6, 8).condition(q) is q


def test_contrastive_loss_equals_a_hand_computation():
    u = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    v = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    s = 10.0
    sim = [[sum(a * b for a, b in zip(ui, vj)) for vj in v.tolist()] for ui in u.tolist()]

    def ce(rows):
        return sum(-s * r[i] + math.log(sum(math.exp(s * x) for x in r)) for i, r in enumerate(rows)) / len(
            rows
        )

    expected = 0.5 * (ce(sim) + ce([list(c) for c in zip(*sim)]))
    assert abs(contrastive_loss(u, v, s).item() - expected) < 1e-5


def test_weight_encoder_scale_is_fixed_unless_learned():
    enc = WeightEncoder(10, 4)
    assert not enc.log_scale.requires_grad and abs(enc.scale.item() - 100) < 1e-3
    assert WeightEncoder(10, 4, learn_scale=True).log_scale.requires_grad
    out = enc(torch.randn(3, 10))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_clip_x0_bounds_the_x0_estimate():
    # ε̂ = 0 makes x̂0 = x_t / √ᾱ_t, huge at large t; DDIM's last step returns x̂0 itself
    zero = lambda x, t: torch.zeros_like(x)
    g = torch.Generator().manual_seed(0)
    free = sample(zero, (4, 3), "ddim", 10, g)
    g = torch.Generator().manual_seed(0)
    clipped = sample(zero, (4, 3), "ddim", 10, g, clip_x0=2.0)
    assert free.abs().max() > 2.0 and clipped.abs().max() <= 2.0 + 1e-6
    with pytest.raises(ValueError, match="dpm"):
        make_scheduler("dpm", clip_x0=1.0)
