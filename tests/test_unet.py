"""ConditionalUNet and its checkpoint loader against the reference manifests and forward goldens.

Every forward golden comparison runs on the config, inputs, seeds and list lengths stored in
``unet_small_golden.pt``; the presets' agreement with those files is tested on its own.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import golden_unet, golden_unet_config

from synray.models.checkpoint import CheckpointError, check_state_dict
from synray.models.ldm_checkpoint import (
    SCHEDULE_BUFFERS,
    infer_unet_config,
    load_unet,
    normalize_unet_state,
    save_unet_checkpoint,
)
from synray.models.unet import FLAVOURS, ConditionalUNet, UNetConfig

TOL = dict(atol=1e-4, rtol=1e-4)

MANIFESTS = {
    "unet_idiff_face_ca": UNetConfig.published("idiff_face"),
    "unet_admis_ca": UNetConfig.published("admis"),
    "unet_uiface": UNetConfig.published("uiface"),
    "unet_idiff_face_adagn_unpublished": UNetConfig.published(condition_type="AdaGN"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gen(reference):
    return reference / "generation"


@pytest.fixture(scope="module")
def golden(gen):
    return torch.load(gen / "unet_small_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def schedule(gen):
    sched = torch.load(gen / "sampler_small_golden.pt", weights_only=True)["schedule"]
    return {k: sched[k] for k in SCHEDULE_BUFFERS}


def _idiff_state(golden):
    return {k: v for k, v in golden["state_dict"].items() if k != "empty_context_embedding"}


@pytest.fixture(scope="module")
def idiff(golden):
    return golden_unet(golden, "idiff_face")


@pytest.fixture(scope="module")
def uiface(golden):
    return golden_unet(golden, "uiface")


def _inputs(golden, dtype=torch.float32):
    inp = golden["inputs"]
    return inp["x"].to(dtype), inp["t"], inp["context"].to(dtype)


def _seeded(ref: dict, stem: str) -> tuple[int, torch.Tensor]:
    """The output stored as ``<stem>_seed<N>`` and the seed N set right before its call."""
    (key,) = [k for k in ref if k.startswith(f"{stem}_seed")]
    return int(key.removeprefix(f"{stem}_seed")), ref[key]


def _attention_slots(logits: list) -> list[int]:
    """Indices of the blocks with attention (non-None entries of a golden logit list)."""
    return [i for i, entry in enumerate(logits) if entry is not None]


def _assert_lists(got, ref, **tol):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a is None) == (b is None), f"slot {i}"
        if b is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"slot {i}: {m}")


# --------------------------------------------------------------------------- state-dict manifests

@pytest.mark.parametrize("name", list(MANIFESTS))
def test_published_presets_are_the_manifest_configs(gen, name):
    man = json.loads((gen / f"{name}.keys.json").read_text())
    assert UNetConfig.from_reference(man["_meta"]["config"]) == MANIFESTS[name]


def test_small_presets_are_the_forward_golden_config(golden):
    """``UNetConfig.small()`` (used by other tests and the benchmarks) is the forward golden's config."""
    assert golden_unet_config(golden) == UNetConfig.small()
    assert golden_unet_config(golden, "uiface") == UNetConfig.small("uiface")


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_state_dict_matches_manifest(gen, name):
    man = json.loads((gen / f"{name}.keys.json").read_text())
    cfg = UNetConfig.from_reference(man["_meta"]["config"])
    with torch.device("meta"):
        model = ConditionalUNet(cfg)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(man["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == man["_meta"]["n_parameters_total"]
    assert len(got) == man["_meta"]["n_state_dict_entries"]
    # The architecture and flavour can be read back from the shapes alone.
    meta_state = {k: torch.empty(v, device="meta") for k, v in man["state_dict"].items()}
    assert infer_unet_config(meta_state) == cfg


def test_published_attention_slots():
    with torch.device("meta"):
        model = ConditionalUNet()
    # 8 down blocks, the middle block, 12 up blocks; up.10 (96 channels at 16x16) has 3 heads.
    assert model.attention_slots == [None, None, 6, 6, 12, 12, 24, 24, 24, 24, 24, 12, 12, 12, 6, 6, 6, 3,
                                     None, None, None]


def test_published_checkpoint_layout_normalises_to_manifest(gen):
    layout = json.loads((gen / "ddpm_checkpoint_layout.json").read_text())
    assert tuple(layout["non_unet_entries"]) == SCHEDULE_BUFFERS
    for name, prefix in (("unet_idiff_face_ca", "module."), ("unet_uiface", "_forward_module.")):
        man = json.loads((gen / f"{name}.keys.json").read_text())["state_dict"]
        raw = {prefix + k: torch.empty(v, device="meta") for k, v in layout["non_unet_entries"].items()}
        raw.update({prefix + layout["unet_prefix"] + k: torch.empty(v, device="meta") for k, v in man.items()})
        state = normalize_unet_state(raw)
        assert list(state) == list(man)
        with torch.device("meta"):
            model = ConditionalUNet(infer_unet_config(state))
        assert model.config.learn_empty_context == (name == "unet_uiface")
        check_state_dict(model, state)


# --------------------------------------------------------------------------- forward goldens

def test_idiff_face_golden(idiff, golden):
    ref = golden["idiff"]
    x, t, ctx = _inputs(golden)
    with torch.no_grad():
        torch.testing.assert_close(idiff(x, t, ctx), ref["eps_cond"], **TOL)
        torch.testing.assert_close(idiff(x, t), ref["eps_empty"], **TOL)
        torch.testing.assert_close(idiff(x, t, ctx, dropout_mask=golden["inputs"]["dropout_mask"]),
                                   ref["eps_dropout_mask"], **TOL)
    assert golden["admis_equals_idiff_maxabs"] == 0.0


def test_idiff_face_golden_float64(golden):
    model = golden_unet(golden, "idiff_face", torch.float64)
    x, t, ctx = _inputs(golden, torch.float64)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, golden["idiff"]["eps_cond_float64"], **TOL)
    # Same operation order as the reference: float64 agrees to rounding, not just to float32 level.
    torch.testing.assert_close(out, golden["idiff"]["eps_cond_float64"], atol=1e-9, rtol=1e-9)


def test_idiff_face_train_mode_cpd_golden(idiff, golden):
    x, t, ctx = _inputs(golden)
    seed, want = _seeded(golden["idiff"], "eps_cond_trainmode")
    idiff.train()
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            out = idiff(x, t, ctx)
            # The empty context is never dropped out, so it needs no randomness.
            torch.manual_seed(0)
            empty = idiff(x, t)
    finally:
        idiff.eval()
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(empty, golden["idiff"]["eps_empty"], **TOL)


def test_uiface_golden_with_attention_logits(uiface, golden):
    ref = golden["uiface"]
    x, t, ctx = _inputs(golden)
    with torch.no_grad():
        eps, self_l, cross_l = uiface(x, t, ctx, return_attn=True)
        torch.testing.assert_close(eps, ref["eps_cond"], **TOL)
        _assert_lists(self_l, ref["self_attn_logits_cond"], **TOL)
        _assert_lists(cross_l, ref["cross_attn_logits_cond"], **TOL)
        eps, self_l, cross_l = uiface(x, t, return_attn=True)
        torch.testing.assert_close(eps, ref["eps_empty"], **TOL)
        _assert_lists(self_l, ref["self_attn_logits_empty"], **TOL)
        _assert_lists(cross_l, ref["cross_attn_logits_empty"], **TOL)
        torch.testing.assert_close(uiface(x, t, ctx, condition_flag=ref["condition_flag"]),
                                   ref["eps_condition_flag"], **TOL)
    # Without injection, UIFace's class is the IDiff-Face class.
    assert torch.equal(ref["eps_cond"], golden["idiff"]["eps_cond"])


def test_uiface_injection_golden(uiface, golden):
    ref = golden["uiface"]
    x, t, ctx = _inputs(golden)
    with torch.no_grad():
        eps, self_l, cross_l = uiface(x, t, ctx, condition_flag=ref["condition_flag"],
                                      self_attn_logits=ref["self_attn_logits_empty"], return_attn=True)
        torch.testing.assert_close(eps, ref["eps_stage1_injected"], **TOL)
        _assert_lists(cross_l, ref["cross_attn_logits_stage1_injected"], **TOL)
        # Returned self logits come from this pass's q.k; the first attention block's input does not
        # depend on the context, so there they equal the empty pass's.
        first = _attention_slots(ref["self_attn_logits_empty"])[0]
        torch.testing.assert_close(self_l[first], ref["self_attn_logits_empty"][first], **TOL)
        eps = uiface(x, t, ctx, self_attn_logits=ref["self_attn_logits_empty"],
                     cross_attn_logits=ref["cross_attn_logits_empty"])
        torch.testing.assert_close(eps, ref["eps_stage2_injected"], **TOL)
        # Injecting freshly computed logits works as well as the stored ones.
        _, s_now, c_now = uiface(x, t, return_attn=True)
        torch.testing.assert_close(uiface(x, t, ctx, self_attn_logits=s_now, cross_attn_logits=c_now),
                                   ref["eps_stage2_injected"], **TOL)


def test_uiface_injection_golden_float64(golden):
    ref = golden["uiface"]
    model = golden_unet(golden, "uiface", torch.float64)
    x, t, ctx = _inputs(golden, torch.float64)
    with torch.no_grad():
        eps = model(x, t, ctx, self_attn_logits=ref["self_attn_logits_empty"],
                    cross_attn_logits=ref["cross_attn_logits_empty"])
    torch.testing.assert_close(eps, ref["eps_stage2_injected_float64"], atol=1e-9, rtol=1e-9)


def test_uiface_train_mode_uncond_golden(uiface, golden):
    ref = golden["uiface"]
    x, t, ctx = _inputs(golden)
    seed, want = _seeded(ref, "eps_cond_trainmode")
    uiface.train()
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            out = uiface(x, t, ctx)
    finally:
        uiface.eval()
    torch.testing.assert_close(out, want, **TOL)
    # Sample 0 is always replaced by the learnable empty context in train mode.
    torch.testing.assert_close(out[0], ref["eps_empty"][0], **TOL)


def test_gradient_checkpointing_is_exact(golden):
    x, t, ctx = _inputs(golden)
    grads = []
    for enabled in (False, True):
        model = golden_unet(golden, "uiface").set_gradient_checkpointing(enabled)
        out = model(x, t, ctx, condition_flag=golden["uiface"]["condition_flag"])
        out.square().mean().backward()
        assert model.empty_context_embedding.grad is not None
        first_attn = next(m for m in model.down if getattr(m, "has_attention", False)).attn
        grads.append((out.detach(), model.empty_context_embedding.grad, first_attn.c_proj_in.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- contract and errors

def test_forward_contract_and_errors(uiface, golden):
    x, t, ctx = _inputs(golden)
    ref = golden["uiface"]
    with torch.no_grad():
        eps = uiface(x, t, ctx)
        assert isinstance(eps, torch.Tensor) and eps.shape == x.shape
        torch.testing.assert_close(uiface(x, int(t[1]), ctx)[1], eps[1], **TOL)  # scalar t broadcasts
    n_slots = len(ref["self_attn_logits_cond"])
    assert uiface.n_attention_slots == n_slots
    with pytest.raises(ValueError, match="x must be"):
        uiface(x[:, :-1], t)
    if len(uiface.config.channel_multipliers) > 1:  # one level never downsamples
        with pytest.raises(ValueError, match="divisible"):
            uiface(x[..., :-1, :-1], t)
    with pytest.raises(ValueError, match="t must be"):
        uiface(x, t[:-1])
    with pytest.raises(ValueError, match="context must be"):
        uiface(x, t, ctx[:, :-1])
    with pytest.raises(ValueError, match="dropout_mask"):
        uiface(x, t, ctx, dropout_mask=golden["inputs"]["dropout_mask"].long())
    with pytest.raises(ValueError, match="condition_flag"):
        uiface(x, t, ctx, condition_flag=ref["condition_flag"][:-1])
    with pytest.raises(ValueError, match=f"{n_slots} entries"):
        uiface(x, t, ctx, self_attn_logits=ref["self_attn_logits_empty"][:-1])
    slot = _attention_slots(ref["cross_attn_logits_empty"])[0]
    bad = list(ref["cross_attn_logits_empty"])
    bad[slot] = bad[slot][:, :-1]
    with pytest.raises(ValueError, match=f"slot {slot}.*cross-attention.*shape"):
        uiface(x, t, ctx, cross_attn_logits=bad)
    without = [i for i in range(n_slots) if i not in _attention_slots(ref["self_attn_logits_empty"])]
    if without:
        bad = [None] * n_slots
        bad[without[0]] = torch.zeros(3, 256, 256)
        with pytest.raises(ValueError, match="no attention"):
            uiface(x, t, ctx, self_attn_logits=bad)
    with pytest.raises(ValueError, match="unknown UNet flavour"):
        UNetConfig.published("dcface")
    with pytest.raises(ValueError, match="initial_channels"):
        UNetConfig(initial_channels=48)
    with pytest.raises(ValueError, match="unknown UNetConfig key"):
        ConditionalUNet(golden_unet_config(golden), context_dropout_probability=0.5)


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("flavour", ["idiff_face", "uiface"])
def test_checkpoint_round_trip_published_layout(tmp_path, golden, schedule, flavour):
    sd = golden["state_dict"] if flavour == "uiface" else _idiff_state(golden)
    # As written by the reference trainer under DDP: module. + eps_model. + the schedule buffers.
    raw = {f"module.{k}": v for k, v in schedule.items()}
    raw.update({f"module.eps_model.{k}": v for k, v in sd.items()})
    src = tmp_path / "ema_averaged_model.ckpt"
    torch.save(raw, src)
    model = load_unet(src)
    assert not model.training
    # Architecture and flavour are read off the weights; the training-only rates, which no checkpoint
    # stores, are the published flavour's.
    rates = {k: v for k, v in FLAVOURS[flavour].items() if k != "learn_empty_context"}
    assert model.config == golden_unet_config(golden, flavour).replace(**rates)
    x, t, ctx = _inputs(golden)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), golden["idiff"]["eps_cond"], **TOL)

    out = tmp_path / "synray.ckpt"
    save_unet_checkpoint(model, out, schedule)
    written = torch.load(out, weights_only=True)
    assert list(written) == list(SCHEDULE_BUFFERS) + [f"eps_model.{k}" for k in sd]
    for k in SCHEDULE_BUFFERS:
        assert torch.equal(written[k], schedule[k])
    for k, v in sd.items():
        assert torch.equal(written[f"eps_model.{k}"], v)
    again = load_unet(out, context_dropout=0.5)
    assert again.config.context_dropout == 0.5
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_checkpoint_errors(tmp_path, golden, schedule):
    sd = _idiff_state(golden)
    attn_key = next(k for k in sd if k.endswith(".attn.c_proj_in.weight"))
    raw = {f"_forward_module.eps_model.{k}": v for k, v in sd.items()}
    raw.update(schedule)
    raw[f"_forward_module.eps_model.{attn_key}"] = torch.zeros(8, 8)
    del raw["_forward_module.eps_model.final.bias"]
    raw["_forward_module.eps_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.ckpt"
    torch.save(raw, path)
    with pytest.raises(CheckpointError) as err:
        load_unet(path)
    msg = str(err.value)
    assert "final.bias" in msg and "extra.weight" in msg and attn_key in msg
    # A UIFace file read as IDiff-Face (explicit config) names the learnable empty context.
    torch.save({f"eps_model.{k}": v for k, v in golden["state_dict"].items()}, path)
    with pytest.raises(CheckpointError, match="empty_context_embedding"):
        load_unet(path, golden_unet_config(golden))
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tmp_path / "missing.ckpt")
    model = ConditionalUNet(golden_unet_config(golden))
    with pytest.raises(ValueError, match="sqrt_alphas_inv"):
        save_unet_checkpoint(model, tmp_path / "x.ckpt",
                             {k: v for k, v in schedule.items() if k != "sqrt_alphas_inv"})
    with pytest.raises(ValueError, match="alphas_prev"):
        save_unet_checkpoint(model, tmp_path / "x.ckpt", {**schedule, "alphas_prev": schedule["alphas"]})
    assert not (tmp_path / "x.ckpt").exists()
