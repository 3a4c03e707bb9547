"""Backbones, CFSM generator, IR key maps and checkpoint loading against the recognition goldens."""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import pytest
import torch

from synray.models import keymap
from synray.models.cfsm import AdaptiveInstanceNorm2d, CFSMGenerator, load_generator
from synray.models.checkpoint import CheckpointError, load_strict
from synray.models.inputs import normalize_images
from synray.models.iresnet import IRESNET_LAYERS
from synray.models.irse import IR_LAYERS, rgb_to_bgr
from synray.models.registry import (
    BACKBONES,
    backbone_info,
    build_backbone,
    list_backbones,
    load_backbone,
)

torch.set_num_threads(1)

REQUIRED = [
    "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
    "elasticface_iresnet50", "elasticface_iresnet100",
    "tface_ir18", "tface_ir50", "tface_ir101", "adaface_ir50",
    "synthdistill_teacher_iresnet100", "tinyfar_a", "tinyfar_b", "tinyfar_c", "lresnet50e_ir_112x96",
]
TINY_IR = dict(layers=(1, 2, 1, 1), widths=(8, 16, 24, 32), embedding_dim=16, input_size=(32, 32))


def _manifest(reference: Path, name: str) -> dict:
    return json.loads((reference / "recognition" / "manifests" / f"{name}.json").read_text())


def _counts(model: torch.nn.Module) -> dict:
    sd = model.state_dict()
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "num_buffer_elements": sum(b.numel() for b in model.buffers()),
        "num_state_dict_entries": len(sd),
        "frozen_parameters": sorted(n for n, p in model.named_parameters() if not p.requires_grad),
    }


def _assert_matches_manifest(model: torch.nn.Module, manifest: dict) -> None:
    sd = model.state_dict()
    assert list(sd) == list(manifest["state_dict"])  # same keys, same order
    for key, shape in manifest["state_dict"].items():
        assert list(sd[key].shape) == shape, key
    meta, got = manifest["meta"], _counts(model)
    for field in ("num_parameters", "num_trainable_parameters", "num_buffer_elements", "num_state_dict_entries"):
        assert got[field] == meta[field], field
    assert got["frozen_parameters"] == sorted(meta["frozen_parameters"])


# ---------------------------------------------------------------- registry and manifests


def test_registry_names_and_unknown_name():
    assert set(REQUIRED) <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*iresnet18.*tinyfar_a"):
        build_backbone("resnet18")
    with pytest.raises(TypeError, match="iresnet18.*bogus"):
        build_backbone("iresnet18", bogus=1)


@pytest.mark.parametrize("name", [n for n in sorted(BACKBONES) if BACKBONES[n].manifest])
def test_state_dict_matches_manifest(reference, name):
    with torch.device("meta"):
        model = build_backbone(name)
    manifest = _manifest(reference, backbone_info(name).manifest)
    _assert_matches_manifest(model, manifest)
    assert (model.embedding_dim,) == tuple(manifest["meta"]["output_shape"][1:])
    assert model.input_size == tuple(manifest["meta"]["input_shape"][2:])


@pytest.mark.parametrize("name", [n for n in sorted(BACKBONES) if not BACKBONES[n].manifest])
def test_state_dict_without_manifest_follows_family_layout(name):
    with torch.device("meta"):
        model = build_backbone(name)
    info = backbone_info(name)
    depth = int("".join(c for c in name.split("_")[-1] if c.isdigit()))
    if info.layout == "insightface":
        assert list(model.state_dict()) == keymap.insightface_keys(IRESNET_LAYERS[depth])
    else:
        assert list(model.state_dict()) == keymap.tface_keys(IR_LAYERS[depth])


def _constructor_args(source: str) -> dict[str, int]:
    """The keyword arguments of the constructor call that ends a manifest's ``source``."""
    call = re.search(r"\(([^()]*)\)$", source).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in call.split(","))}


def test_cfsm_generator_matches_manifest(reference):
    manifest = _manifest(reference, "cfsm_generator")
    with torch.device("meta"):
        model = CFSMGenerator(**_constructor_args(manifest["meta"]["source"]))
    _assert_matches_manifest(model, manifest)


def test_family_specifics():
    with torch.device("meta"):
        insight = build_backbone("iresnet50")
        elastic = build_backbone("elasticface_iresnet50")
        teacher = build_backbone("synthdistill_teacher_iresnet100")
        ada = build_backbone("adaface_ir50")
    assert not insight.features.weight.requires_grad and insight.features.bias.requires_grad
    assert insight.dropout.p == 0.0 and elastic.dropout.p == 0.4
    assert all(m.eps == 2e-5 for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert teacher.features.weight.requires_grad and isinstance(teacher.dropout, torch.nn.Dropout2d)
    assert teacher.pixel_std == 128.0
    assert ada.channel_order == "BGR" and ada.returns_norm
    assert build_backbone("lresnet50e_ir_112x96", layers=(1, 1, 1, 1)).input_size == (112, 96)


# ---------------------------------------------------------------- goldens


@pytest.fixture(scope="module")
def golden(reference):
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            path = reference / "recognition" / "golden" / f"{name}.pt.xz"
            with lzma.open(path) as f:
                cache[name] = torch.load(f, weights_only=True)
        return cache[name]

    return get


@pytest.mark.parametrize(
    "golden_name, backbone, atol",
    [("insightface_iresnet18", "iresnet18", 1e-4), ("tface_ir18", "tface_ir18", 1e-4),
     ("synthdistill_tinyfar_a", "tinyfar_a", 1e-6)],
)
def test_golden_forward(golden, golden_name, backbone, atol):
    g = golden(golden_name)
    model = build_backbone(backbone)
    load_strict(model, g["state_dict"], what=golden_name).eval()
    with torch.no_grad():
        out = model(g["input"])
    assert out.shape == g["output_float64"].shape
    torch.testing.assert_close(out.double(), g["output_float64"], atol=atol, rtol=0)


def test_tface_golden_converted_to_iresnet(golden):
    """TFace IR-18 weights in the insightface graph give TFace's golden output (exact emulation)."""
    g = golden("tface_ir18")
    model = build_backbone("iresnet18")
    model.load_state_dict(keymap.tface_to_insightface(g["state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(g["input"])
    torch.testing.assert_close(out.double(), g["output_float64"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- key maps


@pytest.mark.parametrize("tface, insight", [(18, 18), (50, 50), (101, 100)])
def test_keymap_matches_reference(reference, tface, insight):
    ref = _manifest(reference, f"keymap_tface_ir_{tface}_to_insightface_iresnet{insight}")
    layers = IR_LAYERS[tface]
    generated = keymap.tface_to_insightface_keys(layers)
    assert generated == ref["tface_ir_to_insightface_iresnet"]
    only = sorted(set(keymap.insightface_keys(layers)) - set(generated.values()))
    assert only == sorted(ref["insightface_only"])
    assert sorted(set(keymap.tface_keys(layers)) - set(generated)) == sorted(ref["tface_only"])


def test_keymap_round_trip_tface(golden):
    state = golden("tface_ir18")["state_dict"]
    back = keymap.insightface_to_tface(keymap.tface_to_insightface(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_keymap_refuses_learned_stage1_shortcut(golden):
    with pytest.raises(keymap.KeymapError, match=r"layer1\.0\.downsample"):
        keymap.insightface_to_tface(golden("insightface_iresnet18")["state_dict"])


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)


def test_keymap_insightface_to_tface_folds_features_exactly():
    """A model whose stage-1 shortcut is the identity converts to TFace with the same outputs,
    including a learned features bias/scale (folded into fc and the running mean)."""
    origin = build_backbone("tface_ir18", **TINY_IR).double()
    _randomize(origin, 0)
    state = keymap.tface_to_insightface(origin.state_dict())  # identity stage-1 shortcut
    g = torch.Generator().manual_seed(5)
    state["features.weight"] = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    state["features.bias"] = torch.randn(16, generator=g, dtype=torch.float64)
    src = build_backbone("iresnet18", **TINY_IR).double()
    src.load_state_dict(state, strict=True)
    dst = build_backbone("tface_ir18", **TINY_IR).double()
    dst.load_state_dict(keymap.insightface_to_tface(src.state_dict()), strict=True)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(src.features.bias, torch.zeros_like(src.features.bias))


def test_keymap_rejects_foreign_state():
    with pytest.raises(keymap.KeymapError, match="not a TFace IR"):
        keymap.tface_to_insightface({"conv1.weight": torch.zeros(1)})
    bad = build_backbone("tface_ir18", **TINY_IR).state_dict()
    del bad["body.1.res_layer.4.weight"]
    with pytest.raises(keymap.KeymapError, match=r"body\.1\.res_layer\.4\.weight"):
        keymap.tface_to_insightface(bad)


# ---------------------------------------------------------------- load_backbone


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_backbone_strips_prefixes_and_containers(tmp_path):
    src = build_backbone("iresnet18", **TINY_IR)
    _randomize(src, 2)
    sd = src.state_dict()
    cases = {
        "plain.pth": sd,
        "ddp.pth": {f"module.{k}": v for k, v in sd.items()},
        "resume.pt": {"epoch": 3, "state_dict_backbone": {f"module.{k}": v for k, v in sd.items()}},
        "lightning.ckpt": {"epoch": 1, "state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                                                      "head.kernel": torch.zeros(16, 5), "head.t": torch.zeros(1),
                                                      "head.batch_mean": torch.ones(1) * 20,
                                                      "head.batch_std": torch.ones(1) * 100}},
    }
    for fname, obj in cases.items():
        torch.save(obj, tmp_path / fname)
        model = load_backbone("iresnet18", tmp_path / fname, **TINY_IR)
        assert _same_state(model, src), fname
        assert not model.training


def test_load_backbone_adaface_lightning(tmp_path):
    src = build_backbone("adaface_ir50", **TINY_IR)
    _randomize(src, 3)
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in src.state_dict().items()},
                           "head.kernel": torch.randn(16, 7), "head.t": torch.zeros(1),
                           "head.batch_mean": torch.full((1,), 20.0), "head.batch_std": torch.full((1,), 100.0)}}
    torch.save(ckpt, tmp_path / "adaface.ckpt")
    model = load_backbone("adaface_ir50", tmp_path / "adaface.ckpt", **TINY_IR)
    assert _same_state(model, src)
    x = torch.rand(2, 3, 32, 32)
    emb, norm = model.forward_rgb(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    raw = model.embed(rgb_to_bgr(x))
    torch.testing.assert_close(emb * norm, raw, atol=1e-5, rtol=1e-5)


def test_load_backbone_converts_tface_file(tmp_path):
    src = build_backbone("tface_ir18", **TINY_IR)
    _randomize(src, 4)
    torch.save(src.state_dict(), tmp_path / "Backbone_Epoch_1_checkpoint.pth")
    model = load_backbone("iresnet18", tmp_path / "Backbone_Epoch_1_checkpoint.pth", **TINY_IR)
    src.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-4, rtol=1e-4)
    # and back: the converted insightface file loads into the TFace graph
    torch.save(model.state_dict(), tmp_path / "insightface.pth")
    again = load_backbone("tface_ir18", tmp_path / "insightface.pth", **TINY_IR)
    with torch.no_grad():
        torch.testing.assert_close(again(x), src(x), atol=1e-4, rtol=1e-4)
    layout_error = r"missing keys .*conv1\.weight.*unexpected keys .*input_layer\.0\.weight"
    with pytest.raises(CheckpointError, match=layout_error):
        load_backbone("iresnet18", tmp_path / "Backbone_Epoch_1_checkpoint.pth", convert=False, **TINY_IR)


def test_load_backbone_mismatch_names_keys(tmp_path):
    sd = build_backbone("iresnet18", **TINY_IR).state_dict()
    missing = {k: v for k, v in sd.items() if k != "layer2.1.conv2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layer2\.1\.conv2\.weight"):
        load_backbone("iresnet18", tmp_path / "missing.pth", **TINY_IR)
    torch.save({**sd, "extra.bias": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra\.bias"):
        load_backbone("iresnet18", tmp_path / "extra.pth", **TINY_IR)
    torch.save(sd, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): fc\.weight"):
        load_backbone("iresnet18", tmp_path / "plain.pth", **{**TINY_IR, "input_size": (48, 48)})
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="no backbone state dict"):
        load_backbone("iresnet18", tmp_path / "nostate.pth", **TINY_IR)
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone("iresnet18", tmp_path / "absent.pth", **TINY_IR)


# ---------------------------------------------------------------- small nets, input sizes, preprocessing


@pytest.mark.parametrize("size", [(112, 112), (64, 48), (37, 37)])
def test_tiny_iresnet_trains_on_any_input_size(size):
    model = build_backbone("iresnet18", layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), embedding_dim=8, input_size=size)
    h, w = ((s + 15) // 16 for s in size)  # four stride-2 stages, rounding up
    assert model.fc.in_features == 16 * h * w
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(0))
    before = model.fc.weight.detach().clone()
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)
    assert torch.equal(model.features.weight, torch.ones(8))  # frozen
    with pytest.raises(ValueError, match=r"built for .* input"):
        model(torch.randn(1, 3, size[0] + 16, size[1]))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, *size))


def test_small_variants_build():
    x = torch.randn(2, 3, 32, 32)
    tiny = build_backbone("tinyfar_a", width_multiplier=0.25, depth_multiplier=0.3, num_features=64, embedding_dim=16)
    assert tiny(x).shape == (2, 16)
    ir = build_backbone("tface_ir50", **TINY_IR)
    assert ir(x).shape == (2, 16)
    lres = build_backbone("lresnet50e_ir_112x96", layers=(1, 1, 1, 1), widths=(8, 8, 8, 16, 16), embedding_dim=16,
                          input_size=(32, 32))
    assert lres(x).shape == (2, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        build_backbone("lresnet50e_ir_112x96", input_size=(112, 100))


def test_normalize_images():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with torch.device("meta"):
        ada, teacher, arc = (build_backbone(n, layers=(1, 1, 1, 1)) for n in
                             ("adaface_ir50", "synthdistill_teacher_iresnet100", "iresnet18"))
    torch.testing.assert_close(normalize_images(arc, img), (img.float() - 127.5) / 127.5)
    torch.testing.assert_close(normalize_images(teacher, img), (img.float() - 127.5) / 128.0)
    torch.testing.assert_close(normalize_images(ada, img), (img.float().flip(1) - 127.5) / 127.5)
    with pytest.raises(ValueError, match="RGB batch"):
        normalize_images(arc, img[0])


# ---------------------------------------------------------------- CFSM generator


def test_cfsm_forward_and_style_gradient(tmp_path):
    torch.manual_seed(0)
    gen = CFSMGenerator().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    o = gen.sample_style(2, generator=torch.Generator().manual_seed(0))
    code, img, regu = gen(x, o)
    assert code.shape == (2, 128) and img.shape == x.shape
    torch.testing.assert_close(code, o @ gen.pca.U + gen.pca.mu)
    assert img.abs().max() <= 1.0
    assert regu.item() < 1e-10  # orthogonal init: U U^T = I
    # per-sample styles: changing sample 1's coefficients leaves sample 0's image unchanged
    o2 = o.clone()
    o2[1] += 1.0
    img2 = gen.generate(x, o2)
    torch.testing.assert_close(img2[0], img[0], atol=1e-6, rtol=0)
    assert (img2[1] - img[1]).abs().max() > 1e-4
    # one signed-gradient ascent step on a loss of the image, as the adversarial augmentation does
    o_adv = o.clone().requires_grad_(True)
    grad = torch.autograd.grad(gen.generate(x, o_adv).square().mean(), [o_adv])[0]
    assert grad.shape == o.shape and grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"style coefficients must have shape \(2, 10\)"):
        gen(x, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="divisible by 4"):
        gen(torch.zeros(1, 3, 30, 30), torch.zeros(1, 10))
    # AdaIN = instance norm with per-sample scale/shift
    norm = AdaptiveInstanceNorm2d(4)
    t = torch.randn(2, 4, 5, 5)
    w, b = torch.rand(2, 4) + 0.5, torch.randn(2, 4)
    mu, var = t.mean((2, 3), keepdim=True), t.var((2, 3), unbiased=False, keepdim=True)
    expected = (t - mu) / torch.sqrt(var + 1e-5) * w[..., None, None] + b[..., None, None]
    torch.testing.assert_close(norm(t, w, b), expected, atol=1e-5, rtol=1e-5)
    # checkpoint container G_state_dict
    torch.save({"G_state_dict": gen.state_dict(), "epoch": 7}, tmp_path / "WiderFace70K.pth")
    loaded = load_generator(tmp_path / "WiderFace70K.pth")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.generate(x, o), img)
    torch.save({"G_state_dict": {k: v for k, v in gen.state_dict().items() if k != "pca.mu"}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"pca\.mu"):
        load_generator(tmp_path / "bad.pth")
