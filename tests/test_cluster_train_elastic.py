"""Losing a training node: Ray Train restarts from the last checkpoint with the workers that are left.

A head plus two nodes that each offer one ``gpu_node`` resource (``ray.cluster_utils.Cluster``)
runs synray's own training (``synray train``, world_tiny on world shards) with elastic
``scaling.num_workers=[1, 2]`` and ``scaling.resources={gpu_node: 1}``, so there is one worker per
node. Once Ray Train has registered two epoch checkpoints, one node is removed without a graceful shutdown. The run
must finish all epochs on one worker, resumed from a checkpoint (not from scratch), with the class
centres of the 2-worker checkpoint re-split onto the single worker and every checkpointed step
written once.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

CONF = Path(__file__).resolve().parents[1] / "conf" / "train" / "world_tiny.yaml"
IDS, PER_ID, SIZE, EPOCHS = 32, 16, 32, 8


def _world_shards(root: str) -> tuple[str, str]:
    from synray.io.images import encode_image
    from synray.io.shards import finish_dataset, write_shard
    from synray.world.world import World

    world = World(seed=0, num_identities=IDS)
    uri = os.path.join(root, "shards")
    for unit in range(IDS // 8):
        ids = [i for i in range(unit * 8, unit * 8 + 8) for _ in range(PER_ID)]
        smp = [j for _ in range(8) for j in range(PER_ID)]
        write_shard(uri, unit, {"image": [encode_image(world.render(i, j, size=SIZE)) for i, j in zip(ids, smp)],
                                "identity": ids, "sample": smp, "kind": ["generated"] * len(ids), "seed": [0] * len(ids),
                                "height": [SIZE] * len(ids), "width": [SIZE] * len(ids)}, {"generator": "world"})
    finish_dataset(uri)
    bins = world.write_verification_bins(os.path.join(root, "bins"), num_pairs=100, size=SIZE, sets={"world-heldout": 1.0})
    return uri, str(bins["world-heldout"])


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[len("checkpoint_"):]) for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (a folder alone may still be uploading)."""
    import json

    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(int(r["metrics"]["step"]) for r in snap.get("checkpoint_results", []))


def test_node_loss_mid_training_resumes_on_fewer_workers(monkeypatch):
    from raycluster import ray_tmpdir

    with ray_tmpdir(monkeypatch, "srtrn-") as tmp:
        _scenario(tmp)


def _scenario(tmp: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from synray.config.base import load_config
    from synray.config.train import TrainConfig
    from synray.jobs import run_job
    from synray.training.checkpointing import CheckpointReader

    data, bins = _world_shards(tmp)
    out = Path(tmp) / "train"
    cfg = load_config(CONF, TrainConfig, [
        "name=elastic", f"data.train={data}", f"eval.bins=[{bins}]", f"eval.every_epochs={EPOCHS}", f"epochs={EPOCHS}",
        "batch_size=32", "schedule.milestones=[6]", "scaling.num_workers=[1,2]", "scaling.resources={gpu_node: 1}",
        "checkpoint.max_failures=3", "checkpoint.num_to_keep=null", f"output.uri={out}", "output.shared=true",
        "tracking.enabled=false", "ray.quiet=true"])

    # faster health checks: the GCS declares the removed node dead in ~3 s instead of ~15 s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 256 * 2**20,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(num_cpus=1, resources={"gpu_node": 1}, object_store_memory=128 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    removed = {}

    def remove_a_node_after_two_epochs() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and len(_registered_steps(out / "elastic")) < 2:
            time.sleep(0.2)
        removed["at_checkpoints"] = _registered_steps(out / "elastic")
        cluster.remove_node(nodes[1], allow_graceful=False)
        removed["time"] = time.time()

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        killer = threading.Thread(target=remove_a_node_after_two_epochs, daemon=True)
        killer.start()
        outcome = run_job(cfg)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert "time" in removed, "the node was never removed: training finished before two checkpoints appeared?"
    assert len(removed["at_checkpoints"]) >= 2
    m = outcome.metrics
    spe = (IDS * PER_ID) // 32  # steps per epoch is the same on 1 or 2 workers (global batch 32)
    # finished every epoch, on the one worker left, continuing from a checkpoint written before the loss
    assert (m["epoch"], m["step"], m["world_size"]) == (EPOCHS, EPOCHS * spe, 1)
    assert m["resumed_from_step"] >= removed["at_checkpoints"][-1] and m["resumed_from_step"] % spe == 0
    assert np.isfinite(m["loss"])
    steps = _checkpoint_steps(out / "elastic")
    assert steps == [spe * e for e in range(1, EPOCHS + 1)], steps  # every epoch checkpointed once, none redone
    names = CheckpointReader.from_uri(outcome.checkpoint_uri).names()
    assert [n for n in names if n.startswith("centres-")] == [f"centres-0000000000-{IDS:010d}.pt"]
    assert set(outcome.verification) == {"world-heldout", "average"}  # evaluated at the end, on the one worker
