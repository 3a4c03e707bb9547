"""Losing a GPU node in the middle of synthesis loses no finished unit and duplicates no identity.

A head plus two nodes with one fake GPU each (``ray.cluster_utils.Cluster``) runs synray's own
synthesis pipeline (``synray.synthesis.pipeline.run_synthesis``, built-in world generator) with the
generation actors on the GPU nodes (``num_gpus=1``, pool of 1-2). A GPU node that runs a
generation actor is killed without a graceful shutdown, from a background thread, while units are
being generated and written. Either Ray Data rides it out (actors and tasks are retried on the
surviving node) or the same config is submitted again, which skips the units whose shard exists.
A few units are finished before the run starts (copied from a clean run): they must be skipped and
never rewritten. Afterwards every unit's shard must exist exactly once, each identity must appear
in exactly one shard with all of its samples, and every shard must equal, row for row and byte for
byte, the shard a clean single-process run (``run_local``) writes.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from synray.config.synth import SynthConfig
from synray.io import shards

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(360)]

UNITS = 16
SEEDED = 4  # units finished "by an earlier submission" before the cluster run starts
UNIT_SIZE = 4
IMAGES_PER_ID = 30
GENERATION_ACTOR = "MapWorker(MapBatches(GenerateStage))"
COLUMNS = ["identity", "sample", "kind", "seed", "height", "width", "image"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def synth_config(uri: str) -> SynthConfig:
    return SynthConfig.model_validate({
        "name": "node-loss", "seed": 3, "output": {"uri": uri},
        "identities": {"count": UNITS * UNIT_SIZE, "unit_size": UNIT_SIZE},
        "generator": {"type": "world", "images_per_identity": IMAGES_PER_ID,
                      "num_gpus": 1, "num_cpus": 0.1, "min_actors": 1, "max_actors": 2},
        "alignment": {"mode": "none"},
        "tracking": {"enabled": False},
        "ray": {"quiet": True},
    })


def test_gpu_node_loss_mid_synthesis_keeps_every_identity_exactly_once(monkeypatch):
    from raycluster import ray_tmpdir

    with ray_tmpdir(monkeypatch, "srloss-") as tmp:
        _node_loss_scenario(tmp)


def _node_loss_scenario(tmp: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from synray.runtime import configure_data_context
    from synray.synthesis.pipeline import run_local, run_synthesis

    t0 = time.time()
    # The reference: an uninterrupted single-process run of the same config.
    clean = os.path.join(tmp, "clean")
    run_local(synth_config(clean))
    # Units 0..SEEDED-1 count as finished by an earlier submission: they must be skipped, not redone.
    out = os.path.join(tmp, "dataset")
    os.makedirs(shards.data_uri(out))
    for unit in range(SEEDED):
        shutil.copy2(shards.shard_uri(clean, unit), shards.data_uri(out))
    seeded = {u: _identity(shards.shard_uri(out, u)) for u in range(SEEDED)}
    cfg = synth_config(out)
    t_clean = time.time() - t0

    # Faster health checks: the GCS declares the killed node dead in ~3 s instead of ~15 s.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "dashboard_agent_listen_port": _free_port(),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    loss: dict = {}
    passes: list[dict] = []
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"gpu_node": 1},
                                    object_store_memory=200 * 2**20) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        configure_data_context(quiet=True)
        assert ray.cluster_resources().get("GPU") == 2
        t_up = time.time() - t0 - t_clean

        def kill_a_gpu_node() -> None:
            """Kill a node whose generation actor is working: at the first new shard, or after 1 s
            of generation if none is out yet (on a loaded machine the writers start late)."""
            deadline, working_since = time.time() + 150, None
            while time.time() < deadline:
                table = list(ray._private.state.actors().values())
                hosts = [a["Address"]["NodeID"] for a in table
                         if a["ActorClassName"] == GENERATION_ACTOR and a["State"] == "ALIVE"]
                victims = [w for w in workers if w.node_id in hosts]
                done = len(shards.list_shards(out)) - SEEDED
                if victims:
                    working_since = working_since or time.time()
                    if done >= 1 or time.time() - working_since >= 1.0:
                        loss.update(new_units_done=done, node=victims[0].node_id,
                                    actors=hosts.count(victims[0].node_id))
                        cluster.remove_node(victims[0], allow_graceful=False)
                        loss["t"] = round(time.time() - t0, 1)
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_gpu_node, daemon=True)
        killer.start()
        for attempt in range(3):
            t_pass = time.time()
            try:
                summary = run_synthesis(cfg, progress=False)
            except Exception as exc:  # a pass may fail on the node loss; re-submitting resumes it
                passes.append({"attempt": attempt, "error": f"{type(exc).__name__}: {str(exc)[:800]}",
                               "s": round(time.time() - t_pass, 1)})
                continue
            passes.append({"attempt": attempt, "written": summary["units_written"],
                           "skipped": summary["units_skipped"], "s": round(time.time() - t_pass, 1)})
            if summary["units_written"] + summary["units_skipped"] == UNITS:
                break
        killer.join(timeout=5)

        # The node really went away, while its generation actor was working and units were pending.
        assert "node" in loss, f"the GPU node was never removed: {passes}"
        assert loss["new_units_done"] < UNITS - SEEDED and loss["actors"] >= 1, (loss, passes)
        # The first pass skipped the finished units.
        assert passes[0].get("skipped", SEEDED) == SEEDED, passes
        # The GCS marks a SIGKILLed node dead only after its health checks fail (some seconds).
        deadline = time.time() + 45
        while loss["node"] in (alive := {n["NodeID"] for n in ray.nodes() if n["Alive"]}):
            assert time.time() < deadline, "the removed node is still reported alive"
            time.sleep(1)
        assert len(alive) == 2
        assert ray.cluster_resources().get("GPU") == 1

        # Submitting the same config again finds every unit done and redoes none.
        again = run_synthesis(cfg, progress=False)
        assert (again["units_written"], again["units_skipped"]) == (0, UNITS), again
        assert again["manifest"]["identities"] == UNITS * UNIT_SIZE
        assert again["manifest"]["rows"] == UNITS * UNIT_SIZE * IMAGES_PER_ID
    finally:
        ray.shutdown()
        cluster.shutdown()
    t_cluster = time.time() - t0 - t_clean

    # Finished units were never rewritten (same file, same modification time).
    for unit, ident in seeded.items():
        assert _identity(shards.shard_uri(out, unit)) == ident, f"finished unit {unit} was rewritten"

    # Every unit exactly once; every identity in exactly one shard with all of its samples.
    found = shards.list_shards(out)
    assert sorted(found) == list(range(UNITS)), passes
    owner: dict[int, int] = {}
    pairs: set[tuple[int, int]] = set()
    for unit, uri in found.items():
        table = shards.read_shard(uri)
        assert table.num_rows == UNIT_SIZE * IMAGES_PER_ID, (unit, table.num_rows)
        for ident, sample in zip(table["identity"].to_pylist(), table["sample"].to_pylist()):
            assert owner.setdefault(ident, unit) == unit, f"identity {ident} in units {owner[ident]} and {unit}"
            assert (ident, sample) not in pairs, f"identity {ident} sample {sample} written twice"
            pairs.add((ident, sample))
        assert shards.shard_metadata(uri)["unit"] == unit
    assert sorted(owner) == list(range(UNITS * UNIT_SIZE))
    assert len(pairs) == UNITS * UNIT_SIZE * IMAGES_PER_ID

    # ... and row for row, byte for byte, what the uninterrupted run wrote.
    for unit, uri in found.items():
        ours = shards.read_shard(uri).select(COLUMNS)
        theirs = shards.read_shard(shards.shard_uri(clean, unit)).select(COLUMNS)
        assert ours.equals(theirs), f"unit {unit} differs from a clean run"
    # A writer killed mid-write may leave a hidden temp file, never a visible partial shard.
    visible = {n for n in os.listdir(shards.data_uri(out)) if not n.startswith(".")}
    assert visible == {shards.shard_name(u) for u in range(UNITS)}
    assert {n for n in os.listdir(out) if not n.startswith(".")} - shards.SIDE_FILES == {shards.DATA_DIR}
    print(f"node loss: removed at {loss['t']}s after {loss['new_units_done']}/{UNITS - SEEDED} new units "
          f"({loss['actors']} generation actor(s) on it); passes {passes}; clean run {t_clean:.1f}s, "
          f"cluster up {t_up:.1f}s, cluster part {t_cluster:.1f}s, total {time.time() - t0:.1f}s")


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns
