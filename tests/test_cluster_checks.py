"""Checks a job passes before it asks a multi-node cluster for anything: local outputs and resources."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_local_output_on_two_nodes_is_refused_unless_shared(monkeypatch, tmp_path):
    from raycluster import ray_tmpdir

    with ray_tmpdir(monkeypatch, "srchk-") as tmp:
        _scenario(Path(tmp), tmp_path)


def _scenario(tmp: Path, out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from synray.config import ConfigError
    from synray.io import shards
    from synray.jobs import load_job, run_job
    from synray.runtime import ResourceError

    base = [f"output.uri={out / 'ds'}", "identities.count=8", "identities.unit_size=4", "generator.images_per_identity=2",
            "tracking.enabled=false", "ray.quiet=true"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 128 * 2**20})
    cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        with pytest.raises(ConfigError, match=r"output.uri: .* is a local path, but this Ray cluster has .* several nodes"):
            run_job(load_job(ROOT / "conf/synth/world.yaml", base))
        assert not (out / "ds").exists()  # refused before anything was written
        # a generator actor bigger than any node can never be placed: refused at once, naming the keys
        with pytest.raises(ResourceError, match=r"generator actor.*generator.min_actors, generator.num_cpus"):
            run_job(load_job(ROOT / "conf/synth/world.yaml", [*base, "output.shared=true", "generator.num_cpus=3"]))
        # more actors than the cluster has CPUs in all: the sum is checked too
        with pytest.raises(ResourceError, match=r"needs \{CPU: 4\.25\} at once"):
            run_job(load_job(ROOT / "conf/synth/world.yaml", [*base, "output.shared=true", "generator.num_cpus=2",
                                                                "generator.min_actors=2", "generator.max_actors=2"]))
        summary = run_job(load_job(ROOT / "conf/synth/world.yaml", [*base, "output.shared=true"])).metrics
        assert summary["units_written"] == 2 and shards.read_manifest(str(out / "ds"))["rows"] == 16
    finally:
        ray.shutdown()
        cluster.shutdown()
