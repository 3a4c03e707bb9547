"""SynthDistill crop/resampling/KD loss and the LR schedules against golden/align_crop_resample*."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synray.distill.resample import (
    crop_and_resize, crop_geometry, kd_loss, kd_metrics, resample_latents, resampling_weights,
)
from synray.training.schedules import (
    PolynomialLRWarmup, PolyScheduler, elasticface_multiplier, elasticface_scheduler, poly_lr,
    polynomial_lr_warmup, step_lr, tface_lr,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def golden(reference):
    with np.load(reference / "recognition" / "golden" / "align_crop_resample.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files if k.startswith("sd_")}


@pytest.fixture(scope="module")
def summary(reference):
    return json.loads((reference / "recognition" / "golden" / "align_crop_resample_schedules.json").read_text())


# ---------------------------------------------------------------- SynthDistill

def test_crop_geometry_256(summary):
    ref = summary["synthdistill_crop_256"]
    g = crop_geometry(256, 256)
    assert g.alpha == pytest.approx(ref["alpha"], abs=1e-15)
    assert list(g.rows) == ref["row_slice"] and list(g.cols) == ref["col_slice"]
    np.testing.assert_allclose(g.c0, ref["c0_float"], atol=1e-12)
    np.testing.assert_allclose(g.c1, ref["c1_float"], atol=1e-12)


def test_crop_and_resize(golden):
    out = crop_and_resize(golden["sd_crop_input_256"])
    assert out.shape == (2, 3, 112, 112)
    torch.testing.assert_close(out, golden["sd_crop_output_112"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        crop_and_resize(golden["sd_crop_input_256"][0])


@pytest.mark.parametrize("coef", [1.0, 0.5])
def test_resampling_step(golden, coef):
    s, t = golden["sd_resample_emb_student"], golden["sd_resample_emb_teacher"]
    torch.testing.assert_close((resampling_weights(s, t) * 2 - 1), golden["sd_resample_cos"], rtol=0, atol=1e-6)
    w_new = resample_latents(golden["sd_resample_w"], s, t, resampling_coef=coef, noise=golden["sd_resample_noise"])
    assert w_new.shape == (4, 14, 512)
    torch.testing.assert_close(w_new, golden[f"sd_resample_w_new_rc{coef}"], rtol=0, atol=1e-6)
    # a perfectly matched sample moves by coef * noise, every layer identical
    torch.testing.assert_close(w_new[0, 0] - golden["sd_resample_w"][0, 0], coef * golden["sd_resample_noise"][0], rtol=0, atol=1e-5)
    assert torch.equal(w_new[:, 0], w_new[:, 13])


def test_resample_draws_from_generator(golden):
    s, t, w = golden["sd_resample_emb_student"], golden["sd_resample_emb_teacher"], golden["sd_resample_w"]
    a = resample_latents(w, s, t, generator=torch.Generator().manual_seed(3))
    b = resample_latents(w, s, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise must have shape"):
        resample_latents(w, s, t, noise=torch.zeros(4, 3))


def test_kd_loss_example(golden, summary):
    ref = summary["synthdistill_kd_loss_example"]
    s, t = golden["sd_resample_emb_student"], golden["sd_resample_emb_teacher"]
    assert float(kd_loss(s, t)) == pytest.approx(ref["mse_mean"], rel=1e-6)
    m = kd_metrics(s, t)
    assert m["mse"] == pytest.approx(ref["mse_mean"], rel=1e-6) and m["cos"] == pytest.approx(ref["cos_mean"], rel=1e-6)


# ---------------------------------------------------------------- LR schedules (exact)

def _run(scheduler_factory, base_lr, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = scheduler_factory(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_insightface_polynomial_warmup(summary):
    ref = summary["lr_schedules"]["insightface_PolynomialLRWarmup_base0.1_warm10_total100_power1"]
    assert ref[0] == 0.1  # quirk kept: the first iteration runs at the base LR
    assert polynomial_lr_warmup(0.1, 10, 100, len(ref)) == ref
    assert _run(lambda o: PolynomialLRWarmup(o, 10, 100, power=1.0), 0.1, len(ref)) == ref


def test_cfsm_poly_scheduler(summary):
    ref = summary["lr_schedules"]["cfsm_PolyScheduler_base0.1_warm10_max100_power2"]
    assert [poly_lr(k, 0.1, 10, 100) for k in range(len(ref))] == ref
    assert _run(lambda o: PolyScheduler(o, 0.1, 100, 10), 0.1, len(ref)) == ref


def test_tface_admis_step_schedule(summary):
    ref = summary["lr_schedules"]["tface_admis_epoch_lr_LRS[0.1,0.01,0.001,0.0001]_STAGES[22,28,32]_40ep"]
    lrs, stages = [0.1, 0.01, 0.001, 0.0001], [22, 28, 32]
    assert [step_lr(e, lrs, stages) for e in range(40)] == ref
    assert tface_lr(0, 50, 1000, lrs, stages, warmup_step=100) == pytest.approx(0.05)
    assert tface_lr(30, 0, 1000, lrs, stages, warmup_step=100) == 0.001
    with pytest.raises(ValueError, match="one more learning rate"):
        step_lr(0, [0.1], stages)


@pytest.mark.parametrize("dataset,key,epochs", [
    ("webface", "elasticface_webface_multiplier_per_epoch", 40),
    ("ms1mv2", "elasticface_ms1mv2_multiplier_per_epoch", 26),
])
def test_elasticface_multipliers(summary, dataset, key, epochs):
    ref = summary["lr_schedules"][key]
    milestones = {"webface": (22, 30, 40), "ms1mv2": (8, 14, 20, 25)}[dataset]
    assert [elasticface_multiplier(e, milestones) for e in range(epochs)] == ref
    assert _run(lambda o: elasticface_scheduler(o, dataset), 1.0, epochs) == ref
