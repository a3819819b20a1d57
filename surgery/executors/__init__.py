"""Where merge and sweep work runs: ``local`` (this process) or ``ray`` (Ray tasks, :mod:`surgery.executors.ray_tasks`).

Both take picklable jobs and give the same results; neither knows what the jobs do (the merge engine hands the Ray
executor a shard-writing task, the sweep its merge-and-evaluate jobs)::

    from surgery.executors import check_executor, run_jobs
    check_executor("ray", "10.0.0.1:6379")
    results = run_jobs("local", [(len, ("abc",))], ["measuring"], print)      # [3]
"""

from __future__ import annotations

from typing import Callable, Sequence

from surgery.errors import BadInput

EXECUTORS = ("local", "ray")  # where the work runs: this process, or Ray tasks
Job = tuple[Callable, tuple]  # a function and its arguments (picklable for Ray)


def check_executor(executor: str, ray_address: str | None) -> None:
    """The one-line errors of ``--executor`` / ``--ray-address``, for every command that takes them.

    Args:
        executor: ``local`` or ``ray``.
        ray_address: a Ray cluster's HOST:PORT, only with ``ray``.

    Example: ``check_executor("local", "h:1")``   # BadInput: --ray-address: applies only with --executor ray
    """
    if executor not in EXECUTORS:
        raise BadInput(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise BadInput("--ray-address: applies only with --executor ray")


def run_jobs(executor: str, jobs: Sequence[Job], labels: Sequence[str], progress: Callable[[str], None], *,
             ray_address: str | None = None, device: str = "cpu") -> list:
    """Run every job, in order here or as Ray tasks, and return their results in the jobs' order.

    Args:
        executor: ``local`` or ``ray``.
        jobs: (function, arguments) pairs.
        labels: one line per job for ``progress``.
        progress: receives a line as each job starts (local) or once all are submitted and done (ray).
        ray_address: the Ray cluster (None: a new local one).
        device: ``cuda`` gives every Ray task one GPU.

    Returns:
        The jobs' return values.

    Example: ``run_jobs("local", [(max, (1, 2))], ["max"], print) == [2]``
    """
    check_executor(executor, ray_address)
    if executor == "ray":
        from surgery.executors.ray_tasks import run_on_ray

        return run_on_ray(jobs, labels, progress, ray_address, device)
    results = []
    for label, (function, args) in zip(labels, jobs):
        progress(label)
        results.append(function(*args))
    return results
