"""Starting or joining Ray, and the checks that must pass before a job asks it for anything.

* :func:`init_ray` attaches to a running cluster (``ray job submit``, ``ray.address``, ``RAY_ADDRESS``) or
  starts a private local one; Ray's token authentication stays as Ray sets it.
* :func:`check_writes` refuses outputs that would silently vanish: under ``ray job submit`` the driver runs
  in Ray's temporary copy of the working dir, so a relative output lands there and is deleted with the session.
* :func:`check_cluster_writes` refuses local outputs on a cluster of several nodes (each would write its own disk)
  unless the config declares the path shared.
* :func:`preflight` compares what a job needs at once with what the cluster has or can autoscale to, so a job
  that can never be scheduled fails with need vs have instead of hanging.

Progress bars are synray's own (:mod:`synray.progress`); Ray Data's are off, and ``quiet`` (``--quiet``,
``SYNRAY_QUIET`` or ``CI``) leaves only synray's summary lines and errors.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from synray.config import ConfigError, RayConfig
from synray.config.paths import is_local
from synray.errors import UserError
from synray.tracking import resolve_tracking_uri

__all__ = ["is_quiet", "init_ray", "under_job_submit", "check_writes", "check_cluster_writes", "check_storage", "preflight",
           "ResourceError", "configure_data_context"]


class ResourceError(UserError):
    """The cluster can never hold what the job needs at once."""


def is_quiet(cfg: RayConfig | None = None) -> bool:
    return bool((cfg and cfg.quiet) or os.environ.get("SYNRAY_QUIET") or os.environ.get("CI"))


class _PoolAtItsSize(logging.Filter):
    """Drops Ray Data's warning that an actor pool handing each actor one task at a time cannot scale up by
    utilization: synray starts the generator pool at the size its units need (one actor per unit, up to
    ``max_actors``; :func:`synray.synthesis.pipeline.build_dataset`), so it never has to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not allow it to scale up" not in record.getMessage()


def configure_data_context(quiet: bool) -> None:
    import ray.data
    from ray.util.debug import log_once

    pool_log = logging.getLogger("ray.data._internal.actor_autoscaler.default_actor_autoscaler")
    if not any(isinstance(f, _PoolAtItsSize) for f in pool_log.filters):
        pool_log.addFilter(_PoolAtItsSize())

    ctx = ray.data.DataContext.get_current()
    # one progress display per job, synray's own (synray.progress): Ray Data's bars are off, and Ray Data's
    # note that they are off has nothing to tell a synray user, so it is marked as already given
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    ctx.print_on_execution_start = False
    if quiet:  # only synray's summary lines and errors
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers
        for name in ("ray.data", "mlflow"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Determinism: shards are keyed by unit, but ordered execution keeps logs and tests reproducible.
    ctx.execution_options.preserve_order = True


def init_ray(cfg: RayConfig | None = None, quiet: bool | None = None) -> bool:
    """Attach to a running Ray (job submit, cluster) or start a local one. Returns True if we started it."""
    import ray

    cfg = cfg or RayConfig()
    quiet = is_quiet(cfg) if quiet is None else quiet
    if ray.is_initialized():
        configure_data_context(quiet)
        return False
    kwargs: dict = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # No cluster given: a private local Ray. More logical CPUs than cores keeps Ray Data's read
        # tasks schedulable next to actor pools and Train workers on small machines.
        # The dashboard comes with a terminal run (Ray Train's placement-group watcher needs its state API, and
        # a person may want to look); quiet runs (CI) save its memory.
        ncpu = cfg.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=ncpu, include_dashboard=not quiet, **kwargs)
    configure_data_context(quiet)
    return True


def under_job_submit() -> str | None:
    """The job's temporary working dir when this driver was started by ``ray job submit --working-dir``."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except ValueError:
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def _writes(cfg: Any) -> dict[str, Any]:
    return cfg.writes() if hasattr(cfg, "writes") else {}


def _tracking_store(cfg: Any) -> str | None:
    tracking = getattr(cfg, "tracking", None)
    if tracking is None or not tracking.enabled:
        return None
    uri = resolve_tracking_uri(tracking)
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def check_writes(cfg: Any) -> None:
    """Under ``ray job submit`` no local output may lie inside the job's temporary working dir."""
    workdir = under_job_submit()
    if workdir is not None:
        root = os.path.join(os.path.realpath(workdir), "")
        what = ("is inside this job's temporary working dir (a relative path resolves into Ray's copy of "
                "--working-dir, which is deleted with the session)")
        for key, out in _writes(cfg).items():
            if is_local(out.uri) and os.path.join(os.path.realpath(out.uri), "").startswith(root):
                raise ConfigError(f"{key}: {out.uri} {what}; give an absolute path on storage every node sees "
                                  f"(and {key.rsplit('.', 1)[0]}.shared: true on a multi-node cluster) or an s3:// URI")
        store = _tracking_store(cfg)
        if store and os.path.realpath(store).startswith(root):
            raise ConfigError(f"tracking.uri: the MLflow store {store} {what}; set tracking.uri to an absolute "
                              "sqlite:/// path or an http:// MLflow server (or MLFLOW_TRACKING_URI), or tracking.enabled: false")


def check_storage(cfg: Any) -> None:
    """Every output can be written: an unreachable S3 endpoint answers in seconds, not after minutes of retries."""
    from synray.io import storage

    for out in _writes(cfg).values():
        storage.check_writable(out.uri)


def _autoscaler_v1_running() -> bool:
    """A v1 autoscaler with an autoscaling config publishes its status but not its node types: the cluster may
    then grow in ways unknown here. Without a config (a local cluster) the monitor runs read-only, its node
    types being the nodes themselves (``node_<id>``)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
    if not raw:
        return False
    report = json.loads(raw).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items()) or bool(report.get("pending_launches"))


def _cluster_shapes() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float], bool]:
    """(node shapes now and per autoscaler node type, totals now, totals at most, may have several nodes).

    Totals at most are infinite when an autoscaler runs whose node types are not known here."""
    import ray
    from ray._private.state import state

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    shapes = [dict(n) for n in nodes]
    now: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            now[k] = now.get(k, 0.0) + float(v)
    most = dict(now)
    multi = len(nodes) > 1
    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state in this cluster
        config = None
    if config is not None:
        grow: dict[str, float] = {}
        for group in config.node_group_configs:
            if group.max_count == 0:
                continue
            res = {k: float(v) for k, v in group.resources.items()}
            shapes.append(res)
            n = math.inf if group.max_count < 0 else group.max_count
            multi = multi or n > 1 or len(config.node_group_configs) > 1
            for k, v in res.items():
                grow[k] = grow.get(k, 0.0) + n * v
        for k, v in grow.items():
            most[k] = max(most.get(k, 0.0), v)
    elif _autoscaler_v1_running():
        return [{"*": math.inf}], now, {"*": math.inf}, True
    return shapes, now, most, multi


def check_cluster_writes(cfg: Any) -> None:
    """On a cluster that has (or may autoscale to) several nodes, a local output must be declared shared."""
    _, _, _, multi = _cluster_shapes()
    if not multi:
        return
    for key, out in _writes(cfg).items():
        if is_local(out.uri) and not out.shared:
            section = key.rsplit(".", 1)[0]
            raise ConfigError(f"{key}: {out.uri} is a local path, but this Ray cluster has (or can grow to) several "
                              f"nodes, each of which would write to its own disk; use an s3:// URI, or a mount every "
                              f"node sees and set {section}.shared: true")


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def preflight(needs: Sequence[Any]) -> None:
    """Fail at once when the cluster can never hold every ``Need`` at the same time (see :class:`synray.jobs.Need`)."""
    if not needs:
        return
    shapes, now, most, _ = _cluster_shapes()
    if "*" in most:  # an autoscaler whose node types are unknown here: nothing can be ruled out
        return
    for need in needs:
        if not any(all(shape.get(k, 0.0) >= v for k, v in need.bundle.items()) for shape in shapes):
            raise ResourceError(
                f"cannot schedule {need.what}: each needs {_fmt(need.bundle)} and no node of this cluster "
                f"(now or after autoscaling) has that much; change {need.keys}. Nodes: "
                + ", ".join(_fmt({k: v for k, v in s.items() if not k.startswith('node:') and 'memory' not in k})
                            for s in shapes))
    for phase in dict.fromkeys(need.phase for need in needs):
        together = [need for need in needs if need.phase == phase]
        total: dict[str, float] = {}
        for need in together:
            for k, v in need.bundle.items():
                total[k] = total.get(k, 0.0) + need.count * v
        short = {k: v for k, v in total.items() if v > most.get(k, 0.0) + 1e-9}
        if short:
            parts = " + ".join(f"{need.what}: {need.count} x {_fmt(need.bundle)} ({need.keys})" for need in together)
            have = ", ".join(f"{k}: {now.get(k, 0.0):g} now, {most.get(k, 0.0):g} at most" for k in sorted(short))
            raise ResourceError(f"cannot schedule this job: it needs {_fmt(short)} at once ({parts}); the cluster has "
                                f"{have}. Lower those settings or add nodes.")
