"""Runs killed with ``kill -9`` are marked failed when the next run starts, instead of staying STARTED for ever.

Dagster's run monitoring (its daemon) asks the run launcher whether a run's worker still lives; the local
instance's default launcher cannot tell, and a run made by ``dagster job execute`` (``make demo``) has no launcher
at all. So each weft run records, when its steps open their IO (:meth:`assets.io_manager.ManifestIOManager.
setup_for_execution`), the process that runs it: host, pid and the process's start time (a pid can be reused), as
the run tag :data:`RUN_WORKER_TAG`. At the same moment it fails every other STARTED run of the instance whose
recorded worker on this host is gone, with a message saying so. Runs on other hosts are left to their launcher
(``orchestration/presets/dagster_cluster.yaml`` turns Dagster's run monitoring on for the k8s launcher, which
can tell).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import dagster as dg

RUN_WORKER_TAG = "weft/run_worker"
"""``host:pid:start`` of the process that runs a run (its run worker, which the multiprocess executor's step
processes are children of)."""


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), or ``None`` if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def run_worker() -> str:
    """This run's worker, as :data:`RUN_WORKER_TAG` records it."""
    parent = multiprocessing.parent_process()  # a step process of the multiprocess executor: its run worker
    pid = parent.pid if parent is not None else os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def _is_gone(worker: str) -> bool:
    host, pid, start = worker.rsplit(":", 2)
    return host == socket.gethostname() and _start_time(int(pid)) != start


def fail_orphaned_runs(instance: dg.DagsterInstance, current_run_id: str | None = None) -> list[str]:
    """Mark failed every STARTED/STARTING run (but ``current_run_id``) whose recorded worker on this host is gone;
    returns their run ids."""
    statuses = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses)):
        worker = run.tags.get(RUN_WORKER_TAG)
        if run.run_id == current_run_id or worker is None or not _is_gone(worker):
            continue
        instance.report_run_failed(run, f"the process running this run ({worker}) is gone (killed?); "
                                        "marked failed when the next run started")
        failed.append(run.run_id)
    return failed


def open_run(instance: dg.DagsterInstance | None, run_id: str | None) -> list[str]:
    """Record this process as ``run_id``'s worker and fail the runs whose workers are gone (see the module doc)."""
    if instance is None or run_id is None:
        return []
    worker = run_worker()
    run = instance.get_run_by_id(run_id)
    if run is not None and run.tags.get(RUN_WORKER_TAG) != worker:
        instance.add_run_tags(run_id, {RUN_WORKER_TAG: worker})
    return fail_orphaned_runs(instance, run_id)
