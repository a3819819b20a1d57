"""``surgery merge --executor ray``: the output's shards as Ray tasks, one task per shard.

A shard depends only on the input tensors it holds, so each task re-opens the recipe's inputs, plans the merge
again (checking it planned the same tensors as the driver), and streams its shard with the writer's
:func:`~surgery.io.writer.write_shard_file`: the same bytes as the local executor. Tasks write into the driver's
hidden staging directory, so the output's parent directory (and the inputs, or the Hub cache) must be on a path
every node sees under the same name (NFS, Lustre...), and the driver's working directory too when the recipe names
inputs by relative paths. The driver then writes the index, config.json, surgery.json and the card, and renames the
staging directory into place: the output appears complete or not at all.

Ray retries a task whose worker (or node) is lost up to ``RETRIES`` times; an error raised by the merge itself is
not retried. A retried task replaces its shard file (a temporary file renamed over it), and the temporary files of
lost attempts are deleted before the rename. AIM factors are computed once on the driver and passed to the tasks.
Ray is an optional extra (``pip install 'surgery[ray]'``) and is imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from surgery.errors import BadInput
from surgery.io.checkpoint import TensorInfo, parse_dtype
from surgery.io.writer import write_shard_file
from surgery.merge.recipe import Recipe

RETRIES = 3  # attempts after the first when a worker is lost
KILL_ONCE = "SURGERY_TEST_KILL_ONCE"  # tests: a marker file path; the first shard task to create it dies mid-shard


EXECUTORS = ("local", "ray")  # where the work runs: this process, or Ray tasks


def check_executor(executor: str, ray_address: str | None) -> None:
    """The one-line errors of ``--executor`` / ``--ray-address``, for every command that takes them."""
    if executor not in EXECUTORS:
        raise BadInput(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise BadInput("--ray-address: applies only with --executor ray")


def import_ray():
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
    already called ``ray.init`` (a library caller, the tests) keeps its connection and ``address`` is ignored."""
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


def run_shard(recipe: Recipe, cwd: str, path: str, header: bytes, order: list[TensorInfo], device: str,
              aim_factors: dict[str, torch.Tensor], kill_marker: str | None = None) -> int:
    """One Ray task: open the inputs, plan the merge, write the shard at ``path``. Returns the bytes written."""
    from surgery.merge.engine import TensorMerger, open_inputs, plan_tensors

    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative input paths mean what they meant on the driver
    dtype = parse_dtype(recipe.dtype) if recipe.dtype else None
    with ExitStack() as stack:
        inputs = open_inputs(recipe, stack)
        plan = plan_tensors(inputs, dtype)
        specs = {planned.spec.name: planned.spec for planned in plan}
        if any(specs.get(spec.name) != spec for spec in order):
            raise RuntimeError(f"{Path(path).name}: this worker planned other tensors than the driver "
                               "(do all nodes see the same inputs?)")
        merger = TensorMerger(recipe, inputs, plan, device, aim_factors)
        write_shard_file(path, header, order, merger, after_header=_die_once(kill_marker))
    return sum(spec.nbytes for spec in order)


class RayShards:
    """The ``write_shards`` of :func:`~surgery.io.writer.write_checkpoint`: every shard as a Ray task."""

    def __init__(self, ray, recipe: Recipe, device: str, aim_factors: dict[str, torch.Tensor],
                 progress: Callable[[int], None] = lambda nbytes: None):
        self.ray, self.recipe, self.aim_factors, self.progress = ray, recipe, aim_factors, progress
        self.device = "cuda" if device.startswith("cuda") else device  # each task sees only the GPU Ray gave it

    def __call__(self, staging: Path, headers: dict[str, tuple[bytes, list[TensorInfo]]]) -> None:
        ray = self.ray
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=1,
                          num_gpus=1 if self.device == "cuda" else 0)(run_shard)
        recipe, factors = ray.put(self.recipe), ray.put(self.aim_factors)
        marker = os.environ.get(KILL_ONCE)
        pending = {task.remote(recipe, os.getcwd(), str(staging / file), header, order, self.device, factors,
                               marker): file for file, (header, order) in headers.items()}
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
