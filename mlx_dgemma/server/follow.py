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

from mlx_dgemma.prompt.multimodal import ImagePrompt
from mlx_dgemma.runtime.distributed import agree, broadcast_array, broadcast_json, launched_group
from mlx_dgemma.server.protocol import Plan

if TYPE_CHECKING:
    from mlx_dgemma.server.worker import Job, Worker

log = logging.getLogger("mlx_dgemma.server")
_PIXELS = ("pixel_values", "image_position_ids")  # ImagePrompt's arrays


def announce(plan: Plan | None) -> None:
    """On rank 0: send ``plan`` (``None``: stop) to the followers. Does nothing in a single process."""
    group = launched_group()
    if group is None:
        return
    if plan is None:
        broadcast_json(None, group)
        return
    images = plan.image_prompt
    # The library's request holds objects (the proposer, a compiled grammar): each rank builds its own.
    data = dataclasses.asdict(dataclasses.replace(plan, image_prompt=None, request=None))
    del data["request"]
    if images is not None:  # the arrays follow the JSON
        data["image_prompt"] = {
            "ids": [int(i) for i in images.ids],
            "digests": list(images.digests),
            "soft_tokens": [int(n) for n in images.soft_tokens],
            "starts": [int(i) for i in images.starts],
        }
    broadcast_json(data, group)
    if images is not None:
        for name in _PIXELS:
            broadcast_array(getattr(images, name), group)


def cancelled(job: Job) -> bool:
    """Whether to stop ``job`` now: its own flag, or on several ranks rank 0's (every rank must call this)."""
    group = launched_group()
    return job.cancelled.is_set() if group is None else agree(job.cancelled.is_set(), group)


def follow(worker: Worker) -> None:
    """On a rank other than 0, on the worker thread: serve rank 0's plans, answering no one, until told to stop."""
    from mlx_dgemma.server.worker import Job

    group = launched_group()
    assert group is not None
    while (data := broadcast_json(None, group)) is not None:
        images = data.pop("image_prompt", None)
        if images is not None:
            images = ImagePrompt(**images, **{name: broadcast_array(None, group) for name in _PIXELS})
        plan = Plan(**{**data, "cache_points": tuple(data.get("cache_points", ())), "image_prompt": images})
        try:
            worker._serve(Job(plan, lambda event: None))
        except Exception:  # rank 0 meets the same error and answers it; keep following
            log.exception("generation failed on rank %d", group.rank())
