"""Images in a generation request: pull them out of chat messages, expand their placeholders, prefill them.

Chat messages take mlx-vlm / OpenAI style image parts: ``{"type": "image", "image": <path | PIL | array |
bytes>}`` (also ``"path"`` / ``"url"`` keys for local paths) and ``{"type": "image_url", "image_url": {"url":
<path or data: URL>}}``; the server fetches http(s) URLs itself (``mlx_dgemma.server``). Each part becomes the
image placeholder in the text the chat template renders; after tokenizing, each placeholder is expanded to the
image's soft tokens, exactly as Gemma 4's processor expands it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_dgemma.errors import GenerationError
from mlx_dgemma.model.image_processing import DEFAULT_BUDGET, ImageInput, expand_image_tokens, process_images
from mlx_dgemma.model.vision import prefill_with_images

IMAGE_PART_TYPES = ("image", "image_url", "input_image")


@dataclass
class ImagePrompt:
    """A prompt's token ids with expanded image placeholders, and the processor output of its images."""

    ids: list[int]
    pixel_values: np.ndarray  # [I, patches, 3 p^2]
    image_position_ids: np.ndarray  # [I, patches, 2]
    digests: list[str]  # sha256 of each image's pixels, in prompt order
    soft_tokens: list[int]  # per image
    starts: list[int]  # where each image's soft tokens start in ``ids``

    def cache_key(self) -> list[int]:
        """``ids`` with each image's soft tokens replaced by a negative id drawn from the image's content: a
        prompt cache keyed by these matches a cached image only when the pixels are the same."""
        key = list(self.ids)
        for digest, start, n in zip(self.digests, self.starts, self.soft_tokens):
            key[start : start + n] = [-1 - int(digest[:15], 16)] * n
        return key


def has_images(prompt: Any) -> bool:
    """True when chat messages carry image content parts."""
    if isinstance(prompt, str) or prompt is None:
        return False
    return any(
        isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES  # token ids (mlx-lm's way) have none
        for m in prompt
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
    )


def split_images(prompt: Any, images: Sequence[ImageInput] | None, placeholder: str) -> tuple[Any, list]:
    """The prompt with each image part replaced by ``placeholder`` text, and the images in prompt order.

    ``images`` given beside a prompt go first, in the (first) user message, unless the text already holds a
    placeholder for each of them.
    """
    found: list[Any] = []
    if prompt is None:  # token ids given instead: they hold the placeholders
        return None, list(images or [])
    if isinstance(prompt, str):
        text = prompt
    else:
        prompt = [_flatten_message(m, placeholder, found) for m in prompt]
        text = None
    extra = list(images or [])
    if extra and found:
        raise GenerationError("give images either as message content parts or as images=[...], not both")
    if extra:
        count = (text if text is not None else "".join(str(m.get("content", "")) for m in prompt)).count(
            placeholder
        )
        missing = len(extra) + len(found) - count
        if missing > 0:
            if text is not None:
                text = placeholder * missing + text
            else:
                user = next((m for m in prompt if m.get("role") == "user"), None)
                if user is None:
                    raise GenerationError("images need a user message to go in: add one")
                user["content"] = placeholder * missing + str(user.get("content", ""))
    return (text if text is not None else prompt), found or extra


def _flatten_message(message: dict, placeholder: str, found: list) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(str(part.get("text", "")))
        elif kind in IMAGE_PART_TYPES:
            found.append(image_from_part(part))
            parts.append(placeholder)
        else:
            raise GenerationError(
                f"unsupported message content part {json.dumps(part)[:80]}: use text and image parts"
            )
    return {**message, "content": "".join(parts)}


def image_from_part(part: dict) -> ImageInput:
    """The image an image content part names: an object, a local path or a ``data:`` URL."""
    value = part.get("image", part.get("path", part.get("url", part.get("image_url"))))
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise GenerationError(f"image part without an image: {json.dumps(part)[:80]}")
    if isinstance(value, str):
        if value.startswith("data:"):
            return decode_data_url(value)
        if value.startswith(("http://", "https://")):
            raise GenerationError(
                "http(s) image URLs are fetched by the server only: download the image and pass its path"
            )
        return Path(value.removeprefix("file://"))
    return value


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 ``data:image/...;base64,...`` URL."""
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise GenerationError("image data: URLs must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise GenerationError("the image data: URL is not valid base64") from None


def image_budget(model: Any) -> int:
    """Soft tokens per image: the checkpoint's processor setting (``max_soft_tokens``), else Gemma 4's 280."""
    folder = Path(getattr(model, "source", "") or ".")
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = folder / name
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError:
                continue
            config = config.get("image_processor", config)
            if config.get("max_soft_tokens"):
                return int(config["max_soft_tokens"])
    return DEFAULT_BUDGET


def prepare(
    model: Any, ids: list[int], images: list[ImageInput], cached: int = 0, budget: int | None = None
) -> ImagePrompt:
    """Expand the placeholders of ``ids`` (one per image) into the images' soft tokens and process the images.

    ``cached``: positions a reusable cache already holds (it may not end inside an image)."""
    vision = getattr(model, "vision_args", None)
    if vision is None:
        raise GenerationError(
            "this checkpoint has no vision tower, so it cannot read images: use a multimodal "
            "checkpoint (e.g. google/diffusiongemma-26B-A4B-it, or one converted without "
            "--drop-vision)"
        )
    budget = budget or image_budget(model)
    processed = process_images(images, budget, vision.patch_size, vision.pooling_kernel_size)
    counts = processed.num_soft_tokens_per_image
    ids = expand_image_tokens(ids, counts, vision.image_token_id, vision.boi_token_id, vision.eoi_token_id)
    limit = model.args.max_position_embeddings
    if len(ids) > limit:
        raise GenerationError(
            f"the prompt with its images takes {len(ids)} tokens ({sum(counts)} for images), over "
            f"the {limit}-token context: give fewer or smaller images"
        )
    starts = [i for i, t in enumerate(ids) if t == vision.image_token_id and (i == 0 or ids[i - 1] != t)]
    if any(s < cached < s + n for s, n in zip(starts, counts)):
        raise GenerationError("the cached prompt ends inside an image: re-encode the prompt from the start")
    return ImagePrompt(
        ids, processed.pixel_values, processed.image_position_ids, processed.digests, counts, starts
    )


def prefill(model: Any, prompt: ImagePrompt, cache: Any, end: int | None = None, chunk: int = 2048) -> None:
    """Encode ``prompt.ids[cache.offset:end]`` into ``cache``, with the images whose soft tokens lie there."""
    end = len(prompt.ids) if end is None else end
    if end <= cache.offset:
        return
    inside = [i for i, s in enumerate(prompt.starts) if cache.offset <= s < end]
    ids = mx.array([prompt.ids[cache.offset : end]], dtype=mx.int32)
    types = (ids == model.vision_args.image_token_id).astype(mx.int32)
    pixels = mx.array(prompt.pixel_values[inside]) if inside else None
    positions = mx.array(prompt.image_position_ids[inside]) if inside else None
    prefill_with_images(model, ids, cache, pixels, positions, types, chunk=chunk)
