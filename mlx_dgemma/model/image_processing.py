"""Gemma 4's image processor with Pillow and numpy only (no torch), and the prompt's image-token expansion.

Matches transformers 5.23 ``Gemma4ImageProcessorPil`` and ``Gemma4Processor`` output for output: images are
converted to RGB (transparency composited onto white), resized with bicubic filtering to the largest size that
keeps the aspect ratio, fits the soft-token budget and is a multiple of ``pooling_kernel_size * patch_size`` per
side, rescaled to [0, 1], cut into 16-pixel patches (row-major, channels last within a patch) and padded to
``budget * pooling_kernel_size**2`` patches, with (x, y) patch positions (-1 for padding). Each image then takes
``<|image>`` + N x ``<|image|>`` + ``<image|>`` in the prompt, N its soft-token count.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from mlx_dgemma.errors import GenerationError

SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # an encoded image file larger than this is refused
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # ... and so is a decoded one with more pixels (decompression bombs)

ImageInput = Union[str, Path, bytes, np.ndarray, "Any"]  # a path, encoded bytes, a uint8 array or a PIL image


@dataclass
class ProcessedImages:
    """What the reference's processor returns for images, under its names (numpy arrays)."""

    pixel_values: np.ndarray  # float32 [I, max_patches, 3 * patch_size**2]
    image_position_ids: np.ndarray  # int32 [I, max_patches, 2], (-1, -1) for padding
    num_soft_tokens_per_image: list[int]
    digests: list[str]  # sha256 of each image's pixels (what a prompt cache keys images by)


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling: int) -> tuple[int, int]:
    """``get_aspect_ratio_preserving_size``: the largest multiple-of-``pooling * patch_size`` size in budget."""
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    side = pooling * patch_size
    th = math.floor(factor * height / side) * side
    tw = math.floor(factor * width / side) * side
    if th == 0 and tw == 0:
        raise GenerationError(
            f"an image of {width}x{height} pixels is too small to read: give a larger image"
        )
    longest = (max_patches // pooling**2) * side
    if th == 0:
        th, tw = side, min(math.floor(width / height) * side, longest)
    elif tw == 0:
        tw, th = side, min(math.floor(height / width) * side, longest)
    return th, tw


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """An image as a uint8 [H, W, 3] array, from a path, encoded bytes, a PIL image or a uint8 array."""
    return np.array(to_rgb_image(image))


def to_rgb_image(image: ImageInput) -> Any:
    """An image as an RGB PIL image (transparency composited onto white), from what ``to_rgb_array`` takes.

    Encoded images are refused by their declared size, before their pixels are decoded."""
    from PIL import Image, ImageOps

    if isinstance(image, (str, Path, bytes, bytearray)):
        image = _open(image)
        if image.getexif().get(0x0112, 1) in range(2, 9):  # an EXIF orientation other than "as stored"
            image = ImageOps.exif_transpose(
                image
            )  # as transformers' load_image: the orientation the camera meant
            # (only then: without one, exif_transpose returns a copy, a second full-size image in memory)
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise GenerationError(
            f"cannot read an image from a {type(image).__name__}: give a file path, bytes, a PIL image or a "
            "uint8 numpy array"
        )
    _check_pixels(image.width, image.height)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return _on_white(image if image.mode == "RGBA" else image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def _on_white(rgba: Any) -> Any:
    """``alpha_composite(white, rgba).convert("RGB")``, a band of rows at a time: besides the image and the
    result, only a band's worth of intermediate images is in memory (not three more full-size images)."""
    from PIL import Image

    width, height = rgba.size
    out = Image.new("RGB", rgba.size)
    rows = max(1, (1 << 22) // max(1, width))
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        band = rgba.crop(box)
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert("RGB"), box)
    return out


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise GenerationError(
            f"image of {width}x{height} pixels is too large (limit {MAX_IMAGE_PIXELS} pixels): "
            "downscale it first"
        )


def declared_size(source: str | Path | bytes | bytearray) -> tuple[int, int]:
    """(width, height) an encoded image declares in its header, read without decoding its pixels;
    ``GenerationError`` when it is not an image or declares more than ``MAX_IMAGE_PIXELS`` pixels."""
    image = _open(source, decode=False)
    try:
        return image.size
    finally:
        image.close()


def _open(source: str | Path | bytes | bytearray, decode: bool = True) -> Any:
    """The image, refused by the size in its header before decoding (``decode=False``: not decoded at all).

    Pillow reads the header only in ``Image.open``; ``load`` allocates the declared size and decodes, so a
    small file declaring a huge size (a decompression bomb) must be refused between the two."""
    from PIL import Image, UnidentifiedImageError

    name = "the image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) > MAX_IMAGE_BYTES:
                raise GenerationError(
                    f"{name} are {len(source)} bytes, over the {MAX_IMAGE_BYTES}-byte limit"
                )
            data = io.BytesIO(source)
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise GenerationError(f"image not found: {source} (give the path of an image file)")
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise GenerationError(
                    f"image {source} is over the {MAX_IMAGE_BYTES}-byte limit: downscale it"
                )
            data = io.BytesIO(path.read_bytes())
        try:
            image = Image.open(data)
        except Image.DecompressionBombError:  # declares over twice Pillow's own limit: refused by Image.open
            raise GenerationError(
                f"the image in {name} is too large to decode (over {MAX_IMAGE_PIXELS} pixels): "
                "downscale it first"
            ) from None
        _check_pixels(image.width, image.height)
        if decode:
            image.load()
        return image
    except GenerationError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        struct.error,
    ) as e:
        raise GenerationError(
            f"cannot read {name} as an image ({type(e).__name__}): give a PNG, JPEG, WebP, GIF or BMP file"
        ) from None


def _from_array(array: np.ndarray) -> Any:
    from PIL import Image

    if (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4))
    ):
        raise GenerationError(
            f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {array.dtype} {list(array.shape)}"
        )
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


def process_image(
    rgb: np.ndarray, budget: int = DEFAULT_BUDGET, patch_size: int = 16, pooling: int = 3
) -> tuple[np.ndarray, np.ndarray, int]:
    """Patches [max_patches, 3 p^2], positions [max_patches, 2] and the soft-token count of one RGB image."""
    from PIL import Image

    return _process(Image.fromarray(rgb), budget, patch_size, pooling)


def _process(image: Any, budget: int, patch_size: int, pooling: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``process_image`` of an RGB PIL image: resized as a PIL image, so only the resized pixels become arrays."""
    from PIL import Image

    if budget not in SUPPORTED_BUDGETS:
        raise GenerationError(
            f"image budget {budget} is not supported: choose one of "
            f"{', '.join(map(str, SUPPORTED_BUDGETS))} soft tokens"
        )
    max_patches = budget * pooling**2
    w, h = image.size
    th, tw = target_size(h, w, patch_size, max_patches, pooling)
    if (th, tw) != (h, w):
        image = image.resize((tw, th), resample=Image.Resampling.BICUBIC)
    rgb = np.asarray(image)
    image = (
        (rgb.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
    )  # as transformers rescales
    ph, pw = th // patch_size, tw // patch_size
    patches = image.reshape(3, ph, patch_size, pw, patch_size).transpose(1, 3, 2, 4, 0).reshape(ph * pw, -1)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2)
    pad = max_patches - len(patches)
    patches = np.pad(patches, ((0, pad), (0, 0)))
    positions = np.pad(positions, ((0, pad), (0, 0)), constant_values=-1)
    return patches, positions.astype(np.int32), ph * pw // pooling**2


def process_images(
    images: list[ImageInput], budget: int = DEFAULT_BUDGET, patch_size: int = 16, pooling: int = 3
) -> ProcessedImages:
    """Every image through :func:`process_image`, stacked as the reference's processor stacks them."""
    pixels, positions, counts, digests = [], [], [], []
    for image in images:
        rgb = to_rgb_image(
            image
        )  # full size only as one PIL image: the arrays below are of the resized pixels
        digests.append(_digest(rgb))
        p, pos, n = _process(rgb, budget, patch_size, pooling)
        del rgb
        pixels.append(p)
        positions.append(pos)
        counts.append(n)
    return ProcessedImages(np.stack(pixels), np.stack(positions), counts, digests)


def _digest(image: Any) -> str:
    """sha256 of ``to_rgb_array(image).tobytes()`` and the array's shape, hashed a band of rows at a time: the
    whole image as bytes (``tobytes`` joins its pieces, twice the size at its peak) is never in memory."""
    digest = hashlib.sha256()
    width, height = image.size
    rows = max(1, (1 << 22) // max(1, width))  # about 4 million pixels a band
    for top in range(0, height, rows):
        digest.update(image.crop((0, top, width, min(height, top + rows))).tobytes())
    digest.update(str((height, width, 3)).encode())
    return digest.hexdigest()


def expand_image_tokens(
    ids: list[int], counts: list[int], image_token_id: int, boi_id: int, eoi_id: int
) -> list[int]:
    """Replace the i-th ``<|image|>`` placeholder in ``ids`` by ``<|image>`` + counts[i] x ``<|image|>`` + ``<image|>``
    (a placeholder already framed by ``<|image>`` / ``<image|>`` keeps its frame)."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != len(counts):
        raise GenerationError(
            f"the prompt has {len(where)} image placeholders for {len(counts)} images: put one "
            "image part (or <|image|>) in the prompt per image"
        )
    out: list[int] = []
    last = 0
    for pos, n in zip(where, counts):
        framed = pos > 0 and ids[pos - 1] == boi_id and pos + 1 < len(ids) and ids[pos + 1] == eoi_id
        out += ids[last : pos - 1] if framed else ids[last:pos]
        out += [boi_id] + [image_token_id] * n + [eoi_id]
        last = pos + 2 if framed else pos + 1
    return out + ids[last:]


def mm_token_type_ids(ids: list[int], image_token_id: int) -> list[int]:
    """1 for image soft tokens, 0 for text: the processor's ``mm_token_type_ids`` for one prompt."""
    return [1 if t == image_token_id else 0 for t in ids]
