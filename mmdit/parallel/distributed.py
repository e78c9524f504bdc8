"""Multi-host: joining the JAX process group.

**Joining** (:func:`maybe_initialize`, called first thing by the training loop). In order:

1. ``cfg.distributed`` (``coordinator`` "host:port", ``num_processes``, ``process_id``, optional
   ``local_device_ids``), else the environment: ``MMDIT_COORDINATOR``, ``MMDIT_NUM_PROCESSES``,
   ``MMDIT_PROCESS_ID`` (``MMDIT_LOCAL_DEVICE_IDS`` "0,1"). ``launch/local.sh`` and
   ``launch/slurm.sh`` set these.
2. ``cfg.distributed.auto`` / ``MMDIT_DISTRIBUTED=auto``, or a detected multi-process cluster
   (SLURM with ``SLURM_NTASKS > 1``, Open MPI, a multi-worker TPU slice): ``jax.distributed.initialize()``
   without arguments, which lets JAX read the cluster's own environment (TPU metadata, SLURM).
3. Otherwise a single process: nothing to do.

It must run before anything touches a JAX backend. Calling it twice (or after the caller already
initialised) is a no-op. CPU processes use gloo collectives (jax's default), so the whole
multi-host path is testable on one machine (``launch/local.sh``, tests/test_multihost.py).

**Data**: which slice of the records each process reads is :mod:`mmdit.data.sharded_iterator`.

Only process 0 writes logs and ``config.json`` (the loop and ``MetricWriter`` check
``jax.process_index() == 0``); every process takes part in orbax saves (each writes its own shards
of the state) and in grain iterator saves.
"""

from __future__ import annotations

import os

import jax

from mmdit.util.plain import plain

ENV_COORDINATOR = "MMDIT_COORDINATOR"
ENV_NUM_PROCESSES = "MMDIT_NUM_PROCESSES"
ENV_PROCESS_ID = "MMDIT_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MMDIT_LOCAL_DEVICE_IDS"
ENV_MODE = "MMDIT_DISTRIBUTED"


def _section(cfg) -> dict:
    d = cfg.get("distributed", None) if cfg is not None else None
    return plain(d) or {}


def _int(value, field: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={value!r} must be an integer") from None


def _or(value, fallback):
    """Config value unless unset (None): configs declare these fields with None defaults."""
    return fallback if value is None else value


def cluster_detected(env=None) -> str | None:
    """Name of a multi-process cluster environment JAX can auto-detect, or None."""
    env = os.environ if env is None else env
    if _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") and int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "ompi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def resolve(cfg=None, env=None) -> dict | None:
    """The ``jax.distributed.initialize`` keyword arguments this process should use (``{}`` means
    auto-detect), or None for a single-process run. Pure: reads ``cfg`` and ``env`` only."""
    env = os.environ if env is None else env
    d = _section(cfg)
    coordinator = d.get("coordinator") or env.get(ENV_COORDINATOR) or None
    if coordinator:
        src = "distributed" if d.get("coordinator") else None
        name = lambda key, var: f"{src}.{key}" if src else var
        n = _int(_or(d.get("num_processes"), env.get(ENV_NUM_PROCESSES)), name("num_processes", ENV_NUM_PROCESSES))
        pid = _int(_or(d.get("process_id"), env.get(ENV_PROCESS_ID)), name("process_id", ENV_PROCESS_ID))
        if n is None or pid is None:
            raise ValueError(
                f"coordinator {coordinator!r} is set but {name('num_processes', ENV_NUM_PROCESSES)} / "
                f"{name('process_id', ENV_PROCESS_ID)} are not: set both (process ids 0..N-1), or unset the "
                f"coordinator to let JAX auto-detect the cluster"
            )
        if not 0 <= pid < n:
            raise ValueError(
                f"{name('process_id', ENV_PROCESS_ID)}={pid} must be in [0, {n}) ({name('num_processes', ENV_NUM_PROCESSES)}={n})"
            )
        kw = dict(coordinator_address=str(coordinator), num_processes=n, process_id=pid)
        ids = _or(d.get("local_device_ids"), env.get(ENV_LOCAL_DEVICE_IDS))
        if ids not in (None, ""):
            kw["local_device_ids"] = [int(i) for i in (ids.split(",") if isinstance(ids, str) else ids)]
        return kw
    if d.get("auto") or env.get(ENV_MODE, "").lower() == "auto" or cluster_detected(env):
        return {}
    return None


def is_initialized() -> bool:
    return bool(jax.distributed.is_initialized())


def maybe_initialize(cfg=None) -> bool:
    """Joins the process group if config/environment say so (module docstring). Returns True when
    this process is (now) part of a multi-process group."""
    if is_initialized():
        return True
    kw = resolve(cfg)
    if kw is None:
        return False
    jax.distributed.initialize(**kw)
    return True
