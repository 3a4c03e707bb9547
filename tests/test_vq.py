"""VQ-f4 first-stage autoencoder against the reference manifests and ``vq_small_golden.pt``.

Models are built from the config each file stores; the presets' agreement with those files is tested
on its own.
"""

from __future__ import annotations

import json

import pytest
import torch

from synray.models.checkpoint import CheckpointError
from synray.models.ldm_checkpoint import load_vq_decoder, load_vq_encoder
from synray.models.vq import VQConfig, VQDecoder, VQEncoder

TOL = dict(atol=1e-5, rtol=1e-5)


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
    return torch.load(gen / "vq_small_golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def cfg(golden):
    return VQConfig.from_reference(golden["config"])


@pytest.fixture(scope="module")
def small(golden, cfg):
    enc, dec = VQEncoder(cfg).eval(), VQDecoder(cfg).eval()
    enc.load_state_dict(golden["encoder_state_dict"], strict=True)
    dec.load_state_dict(golden["decoder_state_dict"], strict=True)
    return enc, dec


def _meta(gen, name: str) -> dict:
    return json.loads((gen / f"{name}.keys.json").read_text())["_meta"]


@pytest.mark.parametrize("name", ["vq_encoder", "vq_decoder"])
def test_published_preset_is_the_manifest_config(gen, name):
    assert VQConfig.from_reference(_meta(gen, name)["config"]) == VQConfig()


def test_small_preset_is_the_golden_config(cfg):
    """``VQConfig.small()`` (used by other tests) is the config of ``vq_small_golden.pt``."""
    assert cfg == VQConfig.small()


@pytest.mark.parametrize("name,cls", [("vq_encoder", VQEncoder), ("vq_decoder", VQDecoder)])
def test_state_dict_matches_manifest(gen, name, cls):
    man = json.loads((gen / f"{name}.keys.json").read_text())
    with torch.device("meta"):
        model = cls(VQConfig.from_reference(man["_meta"]["config"]))
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(man["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == man["_meta"]["n_parameters_total"]


def test_published_shapes(gen):
    """The manifest's input (the size its decoded shape restores) encodes to its latent shape and back."""
    meta = _meta(gen, "vq_encoder")
    latent_key = next(k for k in meta if k.startswith("latent_shape_for_"))
    cfg = VQConfig.from_reference(meta["config"])
    batch = 2
    with torch.device("meta"):
        enc, dec = VQEncoder(cfg), VQDecoder(cfg)
        z = enc.encode(torch.empty(batch, *meta["decoded_shape"][1:]))
        zq, idx = dec.quantize(z)
        x = dec.decode(z)
    assert list(z.shape[1:]) == meta[latent_key][1:]
    assert zq.shape == z.shape and idx.shape == (batch, *meta[latent_key][2:])
    assert list(x.shape[1:]) == meta["decoded_shape"][1:]


def test_golden(small, golden):
    enc, dec = small
    with torch.no_grad():
        z = enc.encode(golden["image"])
        torch.testing.assert_close(z, golden["z"], **TOL)
        zq, idx = dec.quantize(z)
        assert torch.equal(idx.reshape(-1), golden["code_indices"])
        torch.testing.assert_close(zq, golden["z_quantized"], **TOL)
        torch.testing.assert_close(dec.decode(z), golden["x_rec"], **TOL)
        torch.testing.assert_close(dec(golden["z"]), golden["x_rec"], **TOL)
        torch.testing.assert_close(dec.decode(z, quantize=False), golden["x_rec_no_quant"], **TOL)
        # Chunked nearest-code search gives the same codes as one big distance matrix.
        assert torch.equal(dec.quantize(z, chunk=7)[1], idx)
        # The quantised latent is a fixed point of quantisation.
        assert torch.equal(dec.quantize(zq)[1], idx)


def test_loaders_strict(tmp_path, small, golden, cfg):
    enc_path = tmp_path / "first_stage_encoder_state_dict.pt"
    dec_path = tmp_path / "first_stage_decoder_state_dict.pt"
    torch.save(golden["encoder_state_dict"], enc_path)
    torch.save({f"module.{k}": v for k, v in golden["decoder_state_dict"].items()}, dec_path)
    enc = load_vq_encoder(enc_path, cfg)
    dec = load_vq_decoder(dec_path, cfg)
    assert not enc.training and not dec.training
    with torch.no_grad():
        torch.testing.assert_close(dec.decode(enc.encode(golden["image"])), golden["x_rec"], **TOL)

    # The published-size modules do not accept the small files: the error names the keys.
    with pytest.raises(CheckpointError, match="encoder.conv_in.weight"):
        load_vq_encoder(enc_path)
    bad = dict(golden["decoder_state_dict"])
    bad["quantize.embedding.weight"] = bad["quantize.embedding.weight"][:1024]
    bad.pop("post_quant_conv.bias")
    torch.save(bad, dec_path)
    with pytest.raises(CheckpointError) as err:
        load_vq_decoder(dec_path, cfg)
    assert "quantize.embedding.weight" in str(err.value) and "post_quant_conv.bias" in str(err.value)
    # An encoder file given to the decoder loader.
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.conv_in.weight"):
        load_vq_decoder(enc_path, cfg)


def test_bad_input(small, golden, cfg):
    enc, dec = small
    _, c, h, w = golden["image"].shape
    _, zc, zh, zw = golden["z"].shape
    with pytest.raises(ValueError, match=rf"image must be \[B, {c}, H, W\]"):
        enc.encode(torch.zeros(1, c + 1, h, w))
    if cfg.downsampling > 1:
        with pytest.raises(ValueError, match=f"divisible by {cfg.downsampling}"):
            enc.encode(torch.zeros(1, c, h - 1, w))
    with pytest.raises(ValueError, match=rf"z must be \[B, {zc}, H, W\]"):
        dec.decode(torch.zeros(1, zc + 1, zh, zw))
    with pytest.raises(ValueError, match="double_z"):
        VQConfig.from_reference({"ddconfig": {"double_z": True, "ch": 32}})
    with pytest.raises(ValueError, match="unknown VQ ddconfig"):
        VQConfig.from_reference({"ddconfig": {"chanels": 32}})
