"""Typed configs: YAML + dotted overrides, errors that name the key, redaction of secrets."""

import pytest

from synray.config import ConfigError, load_config, redact, to_yaml
from synray.config.synth import SynthConfig
from synray.jobs import load_job

YAML = """
kind: synth
seed: 3
identities: {count: 10, unit_size: 4}
generator: {type: world, images_per_identity: 5}
"""


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    return p


def test_load_and_override(cfg_file):
    cfg = load_job(cfg_file, ["identities.count=20", "generator.sampler.steps=7", "tracking.enabled=false"])
    assert isinstance(cfg, SynthConfig)
    assert cfg.seed == 3 and cfg.identities.count == 20 and cfg.identities.unit_size == 4
    assert cfg.generator.sampler.steps == 7 and cfg.tracking.enabled is False


@pytest.mark.parametrize(
    "override, key",
    [
        ("identities.cont=5", "identities.cont: unknown key"),
        ("identities.count=-1", "identities.count"),
        ("identities.count=lots", "identities.count"),
        ("generator.sampler.method=euler", "generator.sampler.method"),
        ("bogus=1", "bogus: unknown key"),
    ],
)
def test_bad_values_name_the_key(cfg_file, override, key):
    with pytest.raises(ConfigError) as err:
        load_job(cfg_file, [override])
    assert key in str(err.value)


def test_cross_field_and_kind_errors(cfg_file, tmp_path):
    with pytest.raises(ConfigError, match="generator.unet and generator.vq_decoder"):
        load_job(cfg_file, ["generator.type=ldm"])
    with pytest.raises(ConfigError, match="kind"):
        load_job(cfg_file, kind="train")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: teleport\n")
    with pytest.raises(ConfigError, match="unknown job kind 'teleport'"):
        load_job(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_job(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, SynthConfig, ["noequals"])


def test_redaction():
    data = {"aws_secret_access_key": "abc", "nested": {"api_token": "t", "lr": 0.1},
            "uri": "http://user:pw@host:5000/x", "plain": "s3://bucket/x"}
    out = redact(data)
    assert out["aws_secret_access_key"] == "***" and out["nested"]["api_token"] == "***"
    assert out["nested"]["lr"] == 0.1 and out["plain"] == "s3://bucket/x"
    assert "pw" not in out["uri"] and out["uri"].startswith("http://***@host")
    cfg = load_config(None, SynthConfig, ["tracking.uri=http://me:secret@mlflow:5000"])
    assert "secret" not in to_yaml(cfg)


def test_shipped_configs_validate():
    from pathlib import Path

    confs = sorted((Path(__file__).resolve().parents[1] / "conf").rglob("*.yaml"))
    assert confs, "conf/ has no configs"
    for path in confs:
        load_job(path)
