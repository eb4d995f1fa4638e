"""The server on several ranks (``mlx.launch``): rank 0 answers HTTP, the other ranks follow its requests.

Before each generation rank 0 sends the request's validated ``Plan`` to every rank; each rank then runs the
same worker code on it (prefill, prompt cache, generation), so that every collective inside the model is
met by every rank. Rank 0 alone knows when a client goes away: at every event of a generation the ranks
agree on rank 0's "cancelled" flag. ``None`` in place of a plan ends the followers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from ..distributed import agree, broadcast_json, launched_group
from ..errors import DGemmaError
from .protocol import Plan

if TYPE_CHECKING:
    from .worker import Job, Worker

log = logging.getLogger("mlx_dgemma.server")


def announce(plan: Plan | None) -> None:
    """On rank 0: send ``plan`` (``None``: stop) to the followers. Does nothing in a single process."""
    group = launched_group()
    if group is None:
        return
    if plan is not None and plan.image_prompt is not None:  # pixels do not travel as JSON
        raise DGemmaError("images are not served on several ranks yet: run the server as one process for images")
    broadcast_json(None if plan is None else dataclasses.asdict(plan), group)


def cancelled(job: Job) -> bool:
    """Whether to stop ``job`` now: its own flag, or on several ranks rank 0's (every rank must call this)."""
    group = launched_group()
    return job.cancelled.is_set() if group is None else agree(job.cancelled.is_set(), group)


def follow(worker: Worker) -> None:
    """On a rank other than 0, on the worker thread: serve rank 0's plans, answering no one, until told to stop."""
    from .worker import Job

    group = launched_group()
    assert group is not None
    while (data := broadcast_json(None, group)) is not None:
        plan = Plan(**{**data, "cache_points": tuple(data.get("cache_points", ()))})
        try:
            worker._serve(Job(plan, lambda event: None))
        except Exception:  # rank 0 meets the same error and answers it; keep following
            log.exception("generation failed on rank %d", group.rank())
