"""Many runs on many machines: send independent runs to a Ray cluster (an optional extra,
``pip install -e ".[cluster]"``).

Each run is one Ray task that asks for its CPUs and GPUs; the task writes its results into its
own run folder (atomically, as every run does), so the driver keeps nothing that a lost worker
could take with it. A task whose worker dies is run again up to ``max_retries`` times (it resumes
from the checkpoint in its folder); after that it is reported as failed, and running the same
command again picks it up. Run folders must be on a file system that every node sees.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "INSTALL_HINT", "ClusterError", "require_ray", "connect", "run_tasks"]

EXECUTORS = ("local", "ray")
INSTALL_HINT = 'pip install -e ".[cluster]"'


class ClusterError(ValueError):
    """Ray is missing or the cluster cannot be reached; the message says what to do."""


def require_ray():
    """The ``ray`` module, or a :class:`ClusterError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--executor ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


def connect(address: Optional[str] = None):
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to), or start
    a local instance when ``address`` is None; a session already connected is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    logger.info("Ray: %s CPU(s), %s GPU(s) in the cluster",
                ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    return ray


Done = Callable[[str, Any, Optional[str]], None]


def run_tasks(fn: Callable[..., Any], jobs: Sequence[Tuple[str, tuple]], done: Done, *,
              address: Optional[str] = None, num_cpus: float = 1, num_gpus: float = 0,
              max_retries: int = 2, stop_grace: float = 660) -> Dict[str, str]:
    """Run ``fn(*args)`` for every ``(key, args)`` of ``jobs`` as a Ray task with ``num_cpus``
    CPUs and ``num_gpus`` GPUs; ``done(key, result, error)`` is called here as each one ends.
    A task whose worker process dies is retried up to ``max_retries`` times, then reported
    (``error``); an exception inside ``fn`` is reported at once. Returns ``{key: error}``.
    Ctrl-C cancels the tasks (each running one gets a KeyboardInterrupt and saves its state) and
    waits up to ``stop_grace`` seconds for them to end before it is raised again."""
    ray = connect(address)
    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                    retry_exceptions=False)
    refs = {remote.remote(*args): key for key, args in jobs}
    errors: Dict[str, str] = {}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                key = refs[ref]
                try:
                    result, error = ray.get(ref), None
                except ray.exceptions.RayTaskError as exc:
                    result, error = None, f"{type(exc.cause).__name__}: {exc.cause}"
                except ray.exceptions.RayError as exc:  # worker or node lost, retries used up
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    result, error = None, f"lost after {max_retries} retries: {type(exc).__name__}: {first}"
                if error is not None:
                    errors[key] = error
                done(key, result, error)
    except BaseException:
        logger.warning("stopping: cancelling %d Ray task(s); running runs save their checkpoints "
                       "(Ctrl-C again to stop waiting for them)", len(pending))
        for ref in pending:
            ray.cancel(ref)
        # Wait for the cancelled tasks to end: a driver that leaves now may take its local Ray
        # instance, and with it the workers whose runs are still saving, down with it.
        if pending:
            _, left = ray.wait(pending, num_returns=len(pending), timeout=stop_grace)
            if left:
                logger.warning("%d cancelled Ray task(s) still running after %g s", len(left), stop_grace)
        raise
    return errors
