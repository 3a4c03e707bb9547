"""The cluster launcher configs in ``cluster/`` validate offline and keep the promised shape.

Validation uses Ray's own schema and checks (``validate_config``), the same code ``ray up`` and the
autoscaler monitor run, without calling AWS. The AWS config goes through ``prepare_config`` first
(as ``ray up`` does: it merges Ray's AWS defaults). The fake multi-node config is validated as the
monitor reads it, raw: ``prepare_config`` would look for a defaults file that the wheel does not ship.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "gr6.", "p3.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check(cfg: dict) -> None:
    """Validate a config the way Ray does for its provider type."""
    cfg = copy.deepcopy(cfg)
    if cfg["provider"]["type"] == "fake_multinode":
        validate_config(cfg)
    else:
        validate_config(prepare_config(cfg))


def worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def is_gpu(node_type: dict) -> bool:
    instance = node_type["node_config"].get("InstanceType", "")
    return instance.startswith(GPU_FAMILIES) or node_type["resources"].get("GPU", 0) > 0


def is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_both_configs_exist():
    assert {p.name for p in YAMLS} >= {"aws-gpu.yaml", "local-fake.yaml"}
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_cluster_yaml_validates_offline(path):
    cfg = yaml.safe_load(path.read_text())
    check(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for name, node_type in worker_types(cfg).items():
        assert node_type.get("min_workers", 0) == 0, f"{path.name}: {name} must start at 0 nodes"
        assert node_type["max_workers"] >= 1, f"{path.name}: {name} can never be added"


# Credentials that must never be written into a repository file.
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"(?i)(aws_secret_access_key|secret_key|aws_session_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "bearer or auth token value": re.compile(r"(?i)(auth_token|RAY_AUTH_TOKEN|bearer)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{24,}"),
    "long hex secret": re.compile(r"\b[0-9a-f]{40,}\b"),
}


def test_secret_patterns_catch_planted_examples():
    """The scan is not vacuous: each pattern fires on a made-up secret of its kind."""
    planted = {
        "AWS access key id": "key: AKIA" + "Q" * 16,
        "AWS secret key setting": "aws_secret_access_key = " + "wJalr/K7MDENG+bPxRfiCY" * 2,
        "private key block": "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "bearer or auth token value": "RAY_AUTH_TOKEN=" + "a1b2c3d4" * 4,
        "long hex secret": "f" * 48,
    }
    for what, text in planted.items():
        assert SECRET_PATTERNS[what].search(text), what


@pytest.mark.parametrize("path", sorted(CLUSTER.iterdir()), ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        m = pattern.search(text)
        assert m is None, f"{path.name} contains a {what}: {m.group(0)[:12]}..."
    if path.suffix == ".yaml":
        cfg = yaml.safe_load(text)
        assert "aws_credentials" not in cfg["provider"], f"{path.name}: credentials belong to the environment"
        assert "ssh_private_key" not in cfg.get("auth", {}), f"{path.name}: no private key paths in the config"


def test_aws_head_does_no_work_and_gpu_types_cover_spot_and_on_demand():
    cfg = load("aws-gpu.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so no work lands on it"
    assert head["resources"].get("GPU", 0) == 0

    workers = worker_types(cfg)
    gpu = {k: v for k, v in workers.items() if is_gpu(v)}
    spot = {k: v for k, v in gpu.items() if is_spot(v)}
    on_demand = {k: v for k, v in gpu.items() if not is_spot(v)}
    assert spot and on_demand, f"need spot and on-demand GPU types, got {sorted(gpu)}"
    assert all(v.get("min_workers", 0) == 0 for v in gpu.values())
    cpu_only = {k: v for k, v in workers.items() if not is_gpu(v)}
    assert cpu_only, "CPU workers for alignment/encoding are missing"
    # Spot must win when both can serve a request: autoscaler v2 (the `ray up` default) ranks by
    # priority; v1 breaks equal scores by the larger type name.
    for s_name, s in spot.items():
        for o_name, o in on_demand.items():
            assert s.get("priority", 0) > o.get("priority", 0), (s_name, o_name)
            assert s_name > o_name, f"v1 would prefer {o_name} over {s_name}"
    # Generation actors and Train workers can ask for a GPU node explicitly.
    for name, v in gpu.items():
        assert v["resources"].get("gpu_node", 0) >= 1, f"{name} lacks the gpu_node resource"
    # S3 through instance profiles, never keys.
    for name, v in workers.items():
        assert "IamInstanceProfile" in v["node_config"], f"{name} has no IAM instance profile for S3"


def test_aws_keeps_token_auth_and_matches_the_client_versions():
    cfg = load("aws-gpu.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), f"{key} must keep token auth on"
        assert not any("RAY_AUTH_MODE=disabled" in c for c in cfg[key])
    assert "~/.ray/auth_token" in cfg["file_mounts"], "every node needs the cluster's auth token"
    image = cfg["docker"]["image"]
    assert f":{ray.__version__}-" in image, f"docker image {image} must carry Ray {ray.__version__}"
    assert f"-py{sys.version_info.major}{sys.version_info.minor}" in image, f"docker image {image} must match the client Python"
    assert any("synray" in c for c in cfg["setup_commands"]), "nodes must install synray"


def test_fake_config_has_an_autoscaling_fake_gpu_type():
    cfg = load("local-fake.yaml")
    p = cfg["provider"]
    assert p["type"] == "fake_multinode"
    assert p["use_node_id_as_ip"] and p["disable_node_updaters"] and p["disable_launch_config_check"]
    # The fake provider names the head type itself; any other name breaks scaling.
    assert cfg["head_node_type"] == "ray.head.default"
    head = cfg["available_node_types"]["ray.head.default"]["resources"]
    assert head.get("GPU", 0) == 0 and 1 <= head["CPU"] <= 2
    gpu = {k: v for k, v in worker_types(cfg).items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, "a fake GPU worker type is required"
    for v in gpu.values():
        assert v["resources"]["GPU"] == 1 and v["resources"]["CPU"] == 1
        assert v["min_workers"] == 0 and v["max_workers"] == 2
        assert v["resources"].get("gpu_node") == 1, "same placement resource as the AWS GPU types"
    assert 0 < cfg["idle_timeout_minutes"] <= 1, "idle fake nodes must go away quickly"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "local-fake.yaml"])
def test_typo_key_is_rejected(name):
    cfg = load(name)
    worker = next(iter(worker_types(cfg).values()))
    worker["max_worker"] = worker.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        check(cfg)


def test_bad_values_are_rejected():
    cfg = load("aws-gpu.yaml")
    bad = copy.deepcopy(cfg)
    next(iter(worker_types(bad).values()))["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        check(bad)
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError, match=r"head_node_type`? must be one of `?available_node_types"):
        check(bad)
    bad = copy.deepcopy(cfg)
    bad["idle_timeout_minute"] = bad.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        check(bad)
    bad = copy.deepcopy(cfg)
    gpu = bad["available_node_types"]["gpu_spot"]
    gpu["resource"] = gpu.pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        check(bad)
