"""LDM training step, EMA schedule and CPD behaviour on a tiny eps-model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from synray.diffusion.schedule import linear_schedule, q_sample
from synray.diffusion.training import (
    EMA,
    context_dropout_mask,
    ldm_loss,
    reference_optimizer,
    training_step,
)

torch.set_num_threads(1)

CTX_DIM = 16


def unet_module():
    try:
        import synray.models.unet as unet
    except ImportError:
        return None
    return unet


class TinyEps(nn.Module):
    """Small conv eps-model with the UNet's call signature (used only if the UNet is unavailable)."""

    def __init__(self) -> None:
        super().__init__()
        self.t_emb = nn.Embedding(1000, 32)
        self.c_emb = nn.Linear(CTX_DIM, 32)
        self.inp = nn.Conv2d(3, 32, 3, padding=1)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x, t, context=None, dropout_mask=None, **_):
        h = self.inp(x) + self.t_emb(t)[:, :, None, None]
        if context is not None:
            h = h + self.c_emb(context)[:, :, None, None]
        return self.out(torch.relu(self.mid(torch.relu(h))))


def tiny_model(context_dropout: float = 0.25, **overrides) -> nn.Module:
    unet = unet_module()
    if unet is None:
        return TinyEps()
    cfg = unet.UNetConfig.small(context_input_channels=CTX_DIM, channel_multipliers=(1,), is_attention=(True,),
                                n_blocks_per_resolution=1, context_dropout=context_dropout, **overrides)
    return unet.ConditionalUNet(cfg)


def toy_latents(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four "identities", each a fixed smooth 3x8x8 pattern plus small noise, with a unit context each."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.randn(4, 3, 2, 2, generator=g), size=(8, 8), mode="bilinear",
                                               align_corners=False)
    ids = torch.arange(n) % 4
    x0 = patterns[ids] + 0.05 * torch.randn(n, 3, 8, 8, generator=g)
    ctx = torch.nn.functional.normalize(torch.randn(4, CTX_DIM, generator=g), dim=1)[ids]
    return x0, ctx


def test_q_sample_and_loss_draws():
    sched = linear_schedule()
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    a, s = sched.sqrt_alpha_bars[t].view(-1, 1, 1, 1), sched.sqrt_one_minus_alpha_bars[t].view(-1, 1, 1, 1)
    expected = a * x0 + s * noise
    torch.testing.assert_close(q_sample(sched, x0, t, noise), expected)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        q_sample(sched, x0, torch.tensor([0, 1, 1000]), noise)
    with pytest.raises(ValueError, match="integer"):
        q_sample(sched, x0, torch.tensor([0.0, 1.0, 2.0]), noise)

    # t is drawn first, then eps, from the given generator; the model sees x_t = q_sample(x0, t, eps)
    seen = {}

    def model(x_t, t, context=None):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss = ldm_loss(model, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t_ref = torch.randint(0, 1000, (3,), generator=g)
    eps_ref = torch.randn(3, 3, 4, 4, generator=g)
    assert torch.equal(seen["t"], t_ref)
    torch.testing.assert_close(seen["x_t"], q_sample(sched, x0, t_ref, eps_ref))
    torch.testing.assert_close(loss, eps_ref.pow(2).mean())


def test_ema_decay_schedule():
    ema = EMA(nn.Linear(2, 2))
    assert ema.decay_at(0) == 0.0 and ema.decay_at(1) == 0.0
    assert math.isclose(ema.decay_at(2), 1 - 2 ** -0.75)
    assert math.isclose(ema.decay_at(10_001), 1 - 10_001 ** -0.75)
    assert ema.decay_at(10**9) == 0.9999
    late = EMA(nn.Linear(2, 2), update_after_step=10)
    assert late.decay_at(11) == 0.0 and math.isclose(late.decay_at(12), 1 - 2 ** -0.75)
    with pytest.raises(ValueError):
        EMA(nn.Linear(2, 2), max_decay=1.5)


def test_ema_reference_compat_copies_weights():
    model = nn.Linear(3, 3)
    ema = EMA(model, reference_compat=True)
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        assert ema.update(model) == 0.0
        torch.testing.assert_close(ema.averaged_model.weight, model.weight, rtol=0, atol=0)


def test_training_reduces_loss_and_ema_matches_formula():
    torch.manual_seed(0)
    model = tiny_model()
    x0, ctx = toy_latents()
    sched = linear_schedule()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    ema = EMA(model)

    def eval_loss(m):
        m.eval()
        with torch.no_grad():
            return float(ldm_loss(m, x0, ctx, schedule=sched, generator=torch.Generator().manual_seed(123)))

    before = eval_loss(model)
    by_hand = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(100):
        idx = torch.randperm(x0.shape[0], generator=g)[:16]
        losses.append(training_step(model, opt, x0[idx], ctx[idx], schedule=sched, ema=ema, generator=g))
        assert model.training  # CPD is active during the step
        n = max(0, step - 1)
        decay = 0.0 if n <= 0 else min(0.9999, 1 - (1 + n) ** -0.75)
        for k, p in model.named_parameters():
            by_hand[k] = decay * by_hand[k] + (1 - decay) * p.detach().double()
    after = eval_loss(model)
    assert after < 0.25 * before, (before, after)  # about 1.0 -> 0.09
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    assert ema.optimization_step == 100
    for k, p in ema.averaged_model.named_parameters():
        torch.testing.assert_close(p.double(), by_hand[k], rtol=1e-5, atol=1e-6)
    assert eval_loss(ema.averaged_model) < before


def test_context_dropout_mask_and_reference_optimizer():
    assert context_dropout_mask(8, 0.0) is None
    m = context_dropout_mask(10_000, 0.3, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.3) < 0.02
    forced = context_dropout_mask(4, 1e-9, generator=torch.Generator().manual_seed(0), force_one=True)
    assert forced.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        context_dropout_mask(4, 1.0)
    opt, sched = reference_optimizer(nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-4
    assert sched.T_0 == 10_000 and sched.T_mult == 2


def test_cpd_is_elementwise_in_train_mode_only():
    unet = unet_module()
    if unet is None:
        pytest.skip("synray.models.unet is not available yet")
    model = tiny_model(context_dropout=0.25)
    ctx = torch.nn.functional.normalize(torch.randn(4096, CTX_DIM), dim=1)
    model.eval()
    with torch.no_grad():
        c_eval = model.project_context(ctx, ctx.shape[0])
        assert torch.equal(model.project_context(ctx, ctx.shape[0]), c_eval)  # no randomness in eval mode
        assert (c_eval != 0).all()
        model.train()
        torch.manual_seed(0)
        c_train = model.project_context(ctx, ctx.shape[0])
    dropped = c_train == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.01  # the configured ratio, per element
    torch.testing.assert_close(c_train[~dropped], c_eval[~dropped] / 0.75)  # kept entries rescaled by 1/(1-p)
    per_sample = dropped.float().mean(dim=1)
    assert per_sample.std() > 0.03  # element-wise: samples lose different numbers of entries
    assert dropped.all(dim=1).float().mean() < 0.01 and dropped.any(dim=1).float().mean() > 0.9


def test_uiface_uncond_replacement_in_train_mode():
    unet = unet_module()
    if unet is None:
        pytest.skip("synray.models.unet is not available yet")
    model = tiny_model(context_dropout=0.25, learn_empty_context=True, unconditioned_probability=0.2)
    ctx = torch.nn.functional.normalize(torch.randn(4096, CTX_DIM), dim=1)
    empty = model.empty_context_embedding.detach()
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        c = model.project_context(ctx, ctx.shape[0])
        is_empty = (c == empty).all(dim=1)
        assert is_empty[0]  # sample 0 is always replaced
        assert abs(is_empty.float().mean().item() - 0.2) < 0.02
        model.eval()
        assert not (model.project_context(ctx, ctx.shape[0]) == empty).all(dim=1).any()
