"""Ray tasks: a connection for the duration of a command, jobs as tasks, and ``surgery merge --executor ray``'s
shards, one task per shard.

A shard depends only on the input tensors it holds, so each shard task (a picklable callable the merge engine
gives, see :class:`surgery.merge.engine.ShardTask`) re-opens the recipe's inputs, plans the merge again and streams
its shard with the writer's :func:`~surgery.io.writer.write_shard_file`: the same bytes as the local executor. Tasks
write into the driver's hidden staging directory, so the output's parent directory (and the inputs, or the Hub
cache) must be on a path every node sees under the same name (NFS, Lustre...), and the driver's working directory
too when the recipe names inputs by relative paths. The driver then writes the index, config.json, surgery.json and
the card, and renames the staging directory into place: the output appears complete or not at all.

Ray retries a task whose worker (or node) is lost up to ``RETRIES`` times; an error raised by the work itself is
not retried. A retried shard task replaces its shard file (a temporary file renamed over it), and the temporary
files of lost attempts are deleted before the rename. Ray is an optional extra (``pip install 'surgery[ray]'``) and
is imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from surgery.errors import BadInput

RETRIES = 3  # attempts after the first when a worker is lost
KILL_ONCE = "SURGERY_TEST_KILL_ONCE"  # tests: a marker file path; the first shard task to create it dies mid-shard


def import_ray():
    """The ``ray`` module; BadInput naming the extra to install when it is missing.

    Returns:
        ``ray``.

    Example: ``ray = import_ray()``
    """
    try:
        import ray
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'surgery[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's long reconnect loop, when nothing listens at a HOST:PORT address."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise BadInput(f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err})") from None


@contextmanager
def ray_connection(address: str | None) -> Iterator:
    """Ray, connected to the cluster at ``address`` (a new local one when None) for the duration. A process that
    already called ``ray.init`` (a library caller, the tests) keeps its connection and ``address`` is ignored.

    Args:
        address: HOST:PORT of a running cluster, or None.

    Returns:
        A context manager giving the ``ray`` module.

    Example::

        with ray_connection(None) as ray:
            ray.get(ray.remote(len).remote("abc"))
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        _check_reachable(address)
        options = {"address": address}
    else:
        options = {"address": "local", "include_dashboard": False, "_node_ip_address": "127.0.0.1"}  # this machine only
    try:
        ray.init(**options, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"--ray-address {address}" if address else "--executor ray"
        raise BadInput(f"{where}: cannot start or reach Ray ({str(err).splitlines()[0] if str(err) else err})") \
            from None
    try:
        yield ray
    finally:
        ray.shutdown()


def task_device(device: str) -> str:
    """The device a task uses: ``cuda`` for any CUDA device (each task sees only the GPU Ray gave it).

    Args:
        device: the driver's device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        ``"cuda"`` for a CUDA device, else ``device`` unchanged.

    Example: ``task_device("cuda:1") == "cuda"``
    """
    return "cuda" if device.startswith("cuda") else device


def _in_directory(directory: str, function: Callable, *args):
    """A Ray task: relative input paths mean what they meant on the driver."""
    if os.path.isdir(directory):
        os.chdir(directory)
    return function(*args)


def run_on_ray(jobs: Sequence[tuple[Callable, tuple]], labels: Sequence[str], progress: Callable[[str], None],
               address: str | None, device: str) -> list:
    """Every job as a Ray task (one GPU each with ``device`` cuda), retried when its worker is lost.

    Args:
        jobs: (function, arguments) pairs, picklable.
        labels: one line per job, reported once the jobs are done.
        progress: receives the lines.
        address: the Ray cluster (None: a new local one).
        device: ``cuda...`` gives each task a GPU.

    Returns:
        The jobs' results, in order; a job's BadInput is raised as is.

    Example: ``run_on_ray([(max, (1, 2))], ["max"], print, None, "cpu") == [2]``
    """
    with ray_connection(address) as ray:
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=1,
                          num_gpus=1 if device.startswith("cuda") else 0)(_in_directory)
        references = [task.remote(os.getcwd(), function, *args) for function, args in jobs]
        progress(f"{len(references)} evaluations submitted to Ray")
        try:
            results = ray.get(references)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, BadInput):
                raise err.cause from None
            raise RuntimeError(f"a sweep task failed: {type(err.cause).__name__}: {err.cause}") from None
    for label in labels:
        progress(f"done: {label}")
    return results


def _die_once(marker: str | None) -> Callable[[], None]:
    def after_header() -> None:
        if not marker:
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)  # a lost worker: no cleanup, half a temporary shard file left behind

    return after_header


def _run_shard(shard_task: Callable, cwd: str, path: str, header: bytes, order: list, kill_marker: str | None) -> int:
    """One Ray task: ``shard_task`` writes the shard at ``path``. Returns the bytes written."""
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative input paths mean what they meant on the driver
    return shard_task(path, header, order, _die_once(kill_marker))


class RayShards:
    """The ``write_shards`` of :func:`~surgery.io.writer.write_checkpoint`: every shard as a Ray task.

    Args:
        ray: the connected ``ray`` module (:func:`ray_connection`).
        shard_task: picklable; ``shard_task(path, header, order, after_header)`` writes one shard file and returns
            its bytes.
        device: ``cuda...`` gives each task a GPU.
        progress: receives each shard's bytes as it completes.

    Example: ``write_checkpoint(out, specs, load, write_shards=RayShards(ray, task, "cpu"))``
    """

    def __init__(self, ray, shard_task: Callable, device: str, progress: Callable[[int], None] = lambda nbytes: None):
        self.ray, self.shard_task, self.progress = ray, shard_task, progress
        self.device = task_device(device)

    def __call__(self, staging: Path, headers: dict[str, tuple[bytes, list]]) -> None:
        ray = self.ray
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=1,
                          num_gpus=1 if self.device == "cuda" else 0)(_run_shard)
        shard_task = ray.put(self.shard_task)
        marker = os.environ.get(KILL_ONCE)
        pending = {task.remote(shard_task, os.getcwd(), str(staging / file), header, order, marker): file
                   for file, (header, order) in headers.items()}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                file = pending.pop(done[0])
                try:
                    self.progress(ray.get(done[0]))
                except ray.exceptions.RayTaskError as err:  # the merge itself failed: not retried
                    if isinstance(err.cause, BadInput):
                        raise err.cause from None
                    raise RuntimeError(f"{file}: {type(err.cause).__name__}: {err.cause}") from None
                except ray.exceptions.RayError as err:  # lost more than RETRIES times
                    raise RuntimeError(f"{file}: the task's worker was lost {RETRIES + 1} times "
                                       f"({type(err).__name__})") from None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        for leftover in staging.glob(".*.partial-*"):  # temporary files of lost attempts
            leftover.unlink(missing_ok=True)
