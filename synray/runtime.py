"""Starting or attaching to Ray with the settings synray relies on.

Progress bars are on by default (Ray Data's own) and off when ``quiet`` is set or ``CI`` is in the
environment, so CI logs stay readable.
"""

from __future__ import annotations

import logging
import os

from synray.config import RayConfig


def is_quiet(cfg: RayConfig | None = None) -> bool:
    return bool((cfg and cfg.quiet) or os.environ.get("SYNRAY_QUIET") or os.environ.get("CI"))


def configure_data_context(quiet: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    # Determinism: shards are keyed by unit, but ordered execution keeps logs and tests reproducible.
    ctx.execution_options.preserve_order = True


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Attach to a running Ray (job submit, cluster) or start a local one. Returns True if we started it."""
    import ray

    cfg = cfg or RayConfig()
    quiet = is_quiet(cfg)
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
        ncpu = cfg.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=ncpu, include_dashboard=False, **kwargs)
    configure_data_context(quiet)
    return True
