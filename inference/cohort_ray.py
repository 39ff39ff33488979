"""The Ray engine of a cohort: each slide is a Ray task running :func:`inference.cohort.run_slide`.

Imported only for ``--engine ray``; Ray is the optional extra ``idc-slide-viewer[cluster]``.
Tasks ask for a GPU where CUDA is there and one CPU otherwise (each runs torch on one thread,
so N workers use N cores); ``address`` joins an existing cluster, none starts a local one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from inference.cohort import CohortError, SlideOutcome, SlideTask, run_slide

log = logging.getLogger(__name__)


def _import_ray():  # noqa: ANN202
    try:
        import ray
    except ImportError:
        raise CohortError('The Ray engine needs the cluster extra: pip install "idc-slide-viewer[cluster]".') from None
    return ray


def run_ray(tasks: Sequence[SlideTask], address: str | None = None, workers: int = 2) -> Iterator[tuple[int, SlideOutcome]]:
    """Run the tasks on Ray, at most ``workers`` at a time; yields (index, outcome) as they finish.

    A task whose worker is lost is retried once, then recorded as failed with the reason.
    """
    ray = _import_ray()
    import torch

    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CohortError(f"Cannot reach the Ray cluster at {address or 'a new local cluster'} ({exc}).") from exc
    gpus = 1 if torch.cuda.is_available() else 0
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_run_on_worker)
    pending: dict[object, int] = {}
    queue = list(enumerate(tasks))
    try:
        while queue or pending:
            while queue and len(pending) < max(1, workers):
                i, task = queue.pop(0)
                pending[remote.remote(replace(task, threads=task.threads or 1))] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            i = pending.pop(ref)
            try:
                yield i, ray.get(ref)
            except ray.exceptions.RayError as exc:
                reason = " ".join(str(exc).split())[:200]
                yield i, SlideOutcome(Path(tasks[i].slide).name, "failed", f"Ray worker lost: {reason}", engine="ray")
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def _run_on_worker(task: SlideTask) -> SlideOutcome:
    return run_slide(task, None, "ray")
