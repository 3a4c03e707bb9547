"""VQ-f4 first-stage autoencoder against the reference manifests and ``vq_small_golden.pt``."""

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
def small(golden):
    cfg = VQConfig.from_reference(golden["config"])
    assert cfg == VQConfig.small()
    enc, dec = VQEncoder(cfg).eval(), VQDecoder(cfg).eval()
    enc.load_state_dict(golden["encoder_state_dict"], strict=True)
    dec.load_state_dict(golden["decoder_state_dict"], strict=True)
    return enc, dec


@pytest.mark.parametrize("name,cls", [("vq_encoder", VQEncoder), ("vq_decoder", VQDecoder)])
def test_state_dict_matches_manifest(gen, name, cls):
    man = json.loads((gen / f"{name}.keys.json").read_text())
    assert VQConfig.from_reference(man["_meta"]["config"]) == VQConfig()
    with torch.device("meta"):
        model = cls()
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(man["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == man["_meta"]["n_parameters_total"]


def test_published_shapes(gen):
    meta = json.loads((gen / "vq_encoder.keys.json").read_text())["_meta"]
    with torch.device("meta"):
        enc, dec = VQEncoder(), VQDecoder()
        z = enc.encode(torch.empty(2, 3, 128, 128))
        zq, idx = dec.quantize(z)
        x = dec.decode(z)
    assert list(z.shape[1:]) == meta["latent_shape_for_128x128_input"][1:]
    assert zq.shape == z.shape and idx.shape == (2, 32, 32)
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


def test_loaders_strict(tmp_path, small, golden):
    enc_path = tmp_path / "first_stage_encoder_state_dict.pt"
    dec_path = tmp_path / "first_stage_decoder_state_dict.pt"
    torch.save(golden["encoder_state_dict"], enc_path)
    torch.save({f"module.{k}": v for k, v in golden["decoder_state_dict"].items()}, dec_path)
    enc = load_vq_encoder(enc_path, VQConfig.small())
    dec = load_vq_decoder(dec_path, VQConfig.small())
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
        load_vq_decoder(dec_path, VQConfig.small())
    assert "quantize.embedding.weight" in str(err.value) and "post_quant_conv.bias" in str(err.value)
    # An encoder file given to the decoder loader.
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.conv_in.weight"):
        load_vq_decoder(enc_path, VQConfig.small())


def test_bad_input(small):
    enc, dec = small
    with pytest.raises(ValueError, match=r"image must be \[B, 3, H, W\]"):
        enc.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 2"):
        enc.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match=r"z must be \[B, 3, H, W\]"):
        dec.decode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="double_z"):
        VQConfig.from_reference({"ddconfig": {"double_z": True, "ch": 32}})
    with pytest.raises(ValueError, match="unknown VQ ddconfig"):
        VQConfig.from_reference({"ddconfig": {"chanels": 32}})
