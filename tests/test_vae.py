"""HVAE network and loss against hand computations."""

import math

import torch

from meta_vqa.nets.vae import WeightVAE, vae_loss


def test_loss_equals_a_hand_computation():
    # B = 2 weight vectors of D = 4, latent 2
    w = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, 0.0]])
    recon = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 3.0, 1.0, 0.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])
    # reconstruction: squared errors per example: (1 + 0 + 1 + 0) = 2 and (0 + 4 + 0 + 0) = 4;
    # sum over dims of the batch mean = (2 + 4) / 2 = 3; divided by sqrt(D) = 2 -> 1.5
    # KL per example: -1/2 Σ (1 + logvar - mu² - exp(logvar))
    #   ex 1: -(1/2)[(1 + 0 - 1 - 1) + (1 + ln 4 - 0 - 4)] = -(1/2)(-1 + ln 4 - 3) = 2 - ln 2
    #   ex 2: -(1/2)[(1 + 0 - 0 - 1) + (1 + 0 - 4 - 1)] = 2
    # mean = (4 - ln 2) / 2; times beta = 0.5; divided by sqrt(D) = 2
    total, rec, kl = vae_loss(recon, w, mu, logvar, beta=0.5)
    expect_kl = 0.5 * (4 - math.log(2)) / 2 / 2
    assert math.isclose(rec.item(), 1.5, rel_tol=1e-6)
    assert math.isclose(kl.item(), expect_kl, rel_tol=1e-6)
    assert math.isclose(total.item(), 1.5 + expect_kl, rel_tol=1e-6)


def test_encoder_offsets_the_log_variance_and_sizes_match_the_paper_formula():
    torch.manual_seed(0)
    D, latent = 50, 6
    vae = WeightVAE(D, latent, (16, 12))
    w = torch.randn(3, D)
    mu, logvar = vae.encode(w)
    raw = vae.encoder(w)
    torch.testing.assert_close(mu, raw[:, :latent])
    torch.testing.assert_close(logvar, raw[:, latent:] - 1.0)
    # encoder D -> 16 -> 12 -> 2·latent, decoder latent -> 12 -> 16 -> D
    assert [lay.out_features for lay in vae.encoder.layers] == [16, 12, 2 * latent]
    assert [lay.out_features for lay in vae.decoder.layers] == [12, 16, D]
    n_enc = sum(p.numel() for p in vae.encoder.parameters())
    assert n_enc == D * 16 + 16 + 16 * 12 + 12 + 12 * 2 * latent + 2 * latent
    # with ε = 0 the forward pass decodes the mean
    recon, mu2, _ = vae(w, eps=torch.zeros(3, latent))
    torch.testing.assert_close(recon, vae.decode(mu2))


def test_paper_scale_parameter_counts():
    with torch.device("meta"):
        vae = WeightVAE(394_240, 128, (128, 128))
    assert sum(p.numel() for p in vae.encoder.parameters()) == 50_512_384
    assert sum(p.numel() for p in vae.decoder.parameters()) == 50_889_984
