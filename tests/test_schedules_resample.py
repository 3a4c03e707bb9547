"""SynthDistill crop/resampling/KD loss and the LR schedules against golden/align_crop_resample*.

Image sizes, resampling coefficients and schedule settings are read from the golden keys that name
them (``sd_crop_input_256``, ``..._base0.1_warm10_total100_power1``) and from the stored arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import golden_key, golden_keys

from synray.distill.resample import (
    crop_and_resize,
    crop_geometry,
    kd_loss,
    kd_metrics,
    resample_latents,
    resampling_weights,
)
from synray.training.schedules import (
    PolynomialLRWarmup,
    PolyScheduler,
    elasticface_multiplier,
    elasticface_scheduler,
    poly_lr,
    polynomial_lr_warmup,
    step_lr,
    tface_lr,
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

def test_crop_geometry(summary):
    key, p = golden_key(summary, "synthdistill_crop_{size}")
    ref = summary[key]
    g = crop_geometry(p["size"], p["size"])
    assert g.alpha == pytest.approx(ref["alpha"], abs=1e-15)
    assert list(g.rows) == ref["row_slice"] and list(g.cols) == ref["col_slice"]
    np.testing.assert_allclose(g.c0, ref["c0_float"], atol=1e-12)
    np.testing.assert_allclose(g.c1, ref["c1_float"], atol=1e-12)


def test_crop_and_resize(golden):
    (source, _), (target, _) = golden_key(golden, "sd_crop_input_{size}"), golden_key(golden, "sd_crop_output_{size}")
    out = crop_and_resize(golden[source])
    assert out.shape == golden[target].shape
    torch.testing.assert_close(out, golden[target], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        crop_and_resize(golden[source][0])


def test_resampling_step(golden):
    s, t = golden["sd_resample_emb_student"], golden["sd_resample_emb_teacher"]
    torch.testing.assert_close((resampling_weights(s, t) * 2 - 1), golden["sd_resample_cos"], rtol=0, atol=1e-6)
    matched = int(golden["sd_resample_cos"].argmax())  # the pair with cosine 1
    for key, p in golden_keys(golden, "sd_resample_w_new_rc{coef}"):
        coef = p["coef"]
        w_new = resample_latents(golden["sd_resample_w"], s, t, resampling_coef=coef, noise=golden["sd_resample_noise"])
        assert w_new.shape == golden["sd_resample_w"].shape
        torch.testing.assert_close(w_new, golden[key], rtol=0, atol=1e-6)
        # a perfectly matched sample moves by coef * noise, every layer identical
        torch.testing.assert_close(w_new[matched, 0] - golden["sd_resample_w"][matched, 0],
                                   coef * golden["sd_resample_noise"][matched], rtol=0, atol=1e-5)
        assert torch.equal(w_new[:, 0], w_new[:, -1])


def test_resample_draws_from_generator(golden):
    s, t, w = golden["sd_resample_emb_student"], golden["sd_resample_emb_teacher"], golden["sd_resample_w"]
    a = resample_latents(w, s, t, generator=torch.Generator().manual_seed(3))
    b = resample_latents(w, s, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise must have shape"):
        resample_latents(w, s, t, noise=torch.zeros(w.shape[0], 3))


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


POLY_WARMUP = "insightface_PolynomialLRWarmup_base{base}_warm{warmup}_total{total}_power{power}"
POLY = "cfsm_PolyScheduler_base{base}_warm{warmup}_max{max}_power{power}"
STEP = "tface_admis_epoch_lr_LRS{lrs}_STAGES{stages}_{epochs}ep"


def test_insightface_polynomial_warmup(summary):
    key, p = golden_key(summary["lr_schedules"], POLY_WARMUP)
    ref = summary["lr_schedules"][key]
    assert ref[0] == p["base"]  # quirk kept: the first iteration runs at the base LR
    assert polynomial_lr_warmup(p["base"], p["warmup"], p["total"], len(ref), p["power"]) == ref
    assert _run(lambda o: PolynomialLRWarmup(o, p["warmup"], p["total"], power=p["power"]), p["base"], len(ref)) == ref


def test_cfsm_poly_scheduler(summary):
    key, p = golden_key(summary["lr_schedules"], POLY)
    ref = summary["lr_schedules"][key]
    assert [poly_lr(k, p["base"], p["warmup"], p["max"], p["power"]) for k in range(len(ref))] == ref
    assert _run(lambda o: PolyScheduler(o, p["base"], p["max"], p["warmup"], p["power"]), p["base"], len(ref)) == ref


def test_tface_admis_step_schedule(summary):
    key, p = golden_key(summary["lr_schedules"], STEP)
    ref = summary["lr_schedules"][key]
    lrs, stages = p["lrs"], p["stages"]
    assert len(ref) == p["epochs"]
    assert [step_lr(e, lrs, stages) for e in range(p["epochs"])] == ref
    # linear warmup over the first 100 iterations (of 1000 per epoch), then the step schedule
    assert tface_lr(0, 50, 1000, lrs, stages, warmup_step=100) == pytest.approx(lrs[0] * 50 / 100)
    assert [tface_lr(e, 0, 1000, lrs, stages, warmup_step=100) for e in range(1, p["epochs"])] == ref[1:]
    with pytest.raises(ValueError, match="one more learning rate"):
        step_lr(0, lrs[:1], stages)


@pytest.mark.parametrize("dataset", ["webface", "ms1mv2"])
def test_elasticface_multipliers(summary, dataset):
    """ElasticFace's per-dataset milestones (its configs) give the stored per-epoch multipliers."""
    ref = summary["lr_schedules"][f"elasticface_{dataset}_multiplier_per_epoch"]
    epochs = len(ref)
    milestones = {"webface": (22, 30, 40), "ms1mv2": (8, 14, 20, 25)}[dataset]
    assert [elasticface_multiplier(e, milestones) for e in range(epochs)] == ref
    assert _run(lambda o: elasticface_scheduler(o, dataset), 1.0, epochs) == ref
