"""Image loading, normalisation and shape-adaptive cutting for mPLUG-Owl3.

Design note
-----------
The official 240728 processor resizes PIL images with bicubic interpolation (torchvision's `Resize` on a
PIL image is PIL's own `Image.resize(..., BICUBIC)`), converts to [0, 1] with `/255` and normalises with
mean = std = 0.5. We reproduce that bit-exactly with PIL + torch, without torchvision.

Cutting ("docowl" anchors): among a fixed set of (rows, cols) grids, pick the one whose *shape* best
matches the image (IoU of the anchor box with the anchor box stretched to the image aspect ratio, weight
100) and, as a tie-break, whose *resolution* best matches (IoU with the image box). The image is resized
to the grid, split row-major into rows*cols crops of size x size, and a global view (the whole image at
size x size) is appended. The official code does the anchor arithmetic in torch with int64 anchor boxes:
the aspect-stretched height is computed in float32 and truncated to an integer, and the IoUs are float32.
`select_grid` reproduces those numerics so that borderline aspect ratios pick the same grid.

User mistakes (missing file, not an image, truncated file, more pixels than `hyperowl.limits.MAX_IMAGE_PIXELS`)
raise `InputError` with one line naming the input; PIL exceptions never escape for them. The pixel limit is
checked from the header, before decoding, with PIL's own "decompression bomb" warning silenced (ours is
stricter, and it is an error with the input's name instead of a warning on stderr).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hyperowl import limits
from hyperowl.errors import InputError

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]

# (rows, cols) anchors of the official "grid_squ_6" set, in the official order (order matters for ties).
GRID_SQU_6: tuple[tuple[int, int], ...] = ((2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2))

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5

_FORMAT_HINT = "pass a PNG/JPEG/WebP/BMP/GIF/TIFF image file"


def _describe(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return "<PIL image>"


# warnings.catch_warnings swaps process-wide state: opens that silence PIL's bomb warning take turns (an open
# reads the header only, so the lock is held for microseconds).
_OPEN_LOCK = threading.Lock()


def _too_many_pixels(label: str, w: int, h: int, limit: int) -> InputError:
    return InputError(f"image '{label}': {w}x{h} is {w * h / 1e6:.1f} megapixels, more than the "
                      f"{limit / 1e6:.1f} megapixel limit (hyperowl.limits.MAX_IMAGE_PIXELS); pass a smaller image")


def _open_decoded(fp: Union[str, io.BytesIO], label: str, max_pixels: int) -> Image.Image:
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fp)
    if img.width * img.height > max_pixels:  # from the header: nothing is decoded yet
        img.close()
        raise _too_many_pixels(label, img.width, img.height, max_pixels)
    try:
        # Force the full decode now: PIL is lazy, and a truncated file only fails on load().
        img.load()
    except BaseException:
        img.close()  # release the file handle of a half-read image
        raise
    return img


def load_image(src: ImageSource, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Load `src` (path, encoded bytes or PIL image) as a fully decoded RGB PIL image.

    `name` is how the input is called in error messages (defaults to the path). `max_pixels`: width x height
    limit (default `hyperowl.limits.MAX_IMAGE_PIXELS`, read at call time).
    """
    label = _describe(src, name)
    max_pixels = limits.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, Image.Image):
        img = src
        if img.width * img.height > max_pixels:
            raise _too_many_pixels(label, img.width, img.height, max_pixels)
        try:
            img.load()  # a lazily opened PIL image may still fail to decode
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"image '{label}': cannot be read ({exc}); {_FORMAT_HINT}") from None
    else:
        if isinstance(src, (bytes, bytearray)):
            fp: Union[str, io.BytesIO] = io.BytesIO(bytes(src))
        elif isinstance(src, (str, os.PathLike)):
            path = Path(src)
            if not path.is_file():
                why = "it is a directory" if path.is_dir() else "file not found"
                raise InputError(f"image '{label}': cannot be read ({why}); {_FORMAT_HINT}")
            fp = os.fspath(path)
        else:
            raise InputError(
                f"image '{label}': unsupported type {type(src).__name__}; pass a file path, bytes or a PIL image"
            )
        try:
            img = _open_decoded(fp, label, max_pixels)
        except InputError:
            raise
        except UnidentifiedImageError:
            raise InputError(f"image '{label}': cannot be read (not a recognised image format); {_FORMAT_HINT}") from None
        except Image.DecompressionBombError as exc:
            raise InputError(f"image '{label}': more than the {max_pixels / 1e6:.1f} megapixel limit ({exc}); "
                             "pass a smaller image") from None
        except (OSError, SyntaxError, ValueError) as exc:
            # OSError covers "image file is truncated" and decoder errors; SyntaxError is what some PIL
            # plugins raise for malformed headers.
            raise InputError(f"image '{label}': cannot be read ({exc}); {_FORMAT_HINT}") from None
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise InputError(f"image '{label}': cannot be converted to RGB ({exc}); {_FORMAT_HINT}") from None
    if img.width < 1 or img.height < 1:
        raise InputError(f"image '{label}': has zero size {img.size}; pass a non-empty image")
    return img


def _pil_to_normalized(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float32 CHW in [-1, 1], with the same op order as ToTensor + Normalize."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    # Same op order as torchvision (to float, /255, -mean, /std) so results are bit-identical.
    return t.to(torch.float32).div(255.0).sub(IMAGE_MEAN).div(IMAGE_STD)


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize `img` to (size, size) with PIL bicubic and normalise to a float32 [3, size, size] tensor."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    resized = img.resize((size, size), Image.Resampling.BICUBIC)
    return _pil_to_normalized(resized)


def images_to_tensor(images: Iterable[Image.Image], size: int, count: Union[int, Callable[[], int]],
                     convert: Optional[Callable[[Image.Image, int], torch.Tensor]] = None) -> torch.Tensor:
    """`torch.stack([convert(im, size) for im in images])` without the list: each image is converted
    into one preallocated [count, 3, size, size] tensor as it arrives, so a long video's pixels exist once
    and no decoded frame is kept. `count` may be a function, asked after the first image (a video sampler
    knows its frame count only once the file is open). `convert` (default `image_to_tensor`, Owl3's pixels)
    is the family's image -> [3, size, size] recipe."""
    convert = convert or image_to_tensor
    out = None
    i = 0
    for i, im in enumerate(images):
        if out is None:
            n = count() if callable(count) else count
            out = torch.empty(n, 3, size, size)
        if i >= out.shape[0]:
            raise ValueError(f"images_to_tensor: more than count={out.shape[0]} images")
        out[i] = convert(im, size)
    if out is None:
        raise ValueError("images_to_tensor: no images")
    if i + 1 != out.shape[0]:
        raise ValueError(f"images_to_tensor: {i + 1} images, not count={out.shape[0]}")
    return out


def select_grid(
    width: int, height: int, size: int = 384, anchors: tuple[tuple[int, int], ...] = GRID_SQU_6
) -> tuple[int, int]:
    """Return the (rows, cols) grid the official "docowl" anchor rank picks for a width x height image."""
    if width < 1 or height < 1:
        raise InputError(f"image size {width}x{height}: must be at least 1x1")
    # Anchor boxes [0, 0, cols*size, rows*size] as int64, like the official tensors.
    aw = torch.tensor([c * size for _, c in anchors], dtype=torch.int64)
    ah = torch.tensor([r * size for r, _ in anchors], dtype=torch.int64)
    area = aw * ah

    # Resolution IoU with the image box [0, 0, width, height]; both boxes start at the origin.
    inter = torch.minimum(aw, torch.tensor(width)) * torch.minimum(ah, torch.tensor(height))
    union = area + width * height - inter
    iou = inter / (union + 1e-5)  # int64 + python float -> float32, as in the official code

    # Shape IoU: the anchor vs. the anchor with its height stretched to the image aspect ratio. The
    # official code writes a float32 product into an int64 tensor, i.e. truncates toward zero.
    shape_h = (height / width * aw).to(torch.int64)
    s_inter = aw * torch.minimum(ah, shape_h)
    s_union = area + aw * shape_h - s_inter
    shape_iou = s_inter / (s_union + 1e-5)

    score = shape_iou * 100 + iou
    best = int(torch.argmax(score))  # first maximum wins
    return anchors[best]


def cut_image(
    img: Image.Image, size: int, anchors: tuple[tuple[int, int], ...] = GRID_SQU_6
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut `img` into a grid of crops plus a global view.

    Returns (pixels [rows*cols + 1, 3, size, size], (rows, cols)); crops are row-major, the global view last.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    rows, cols = select_grid(img.width, img.height, size, anchors)
    big = _pil_to_normalized(img.resize((cols * size, rows * size), Image.Resampling.BICUBIC))
    # [3, rows*S, cols*S] -> [rows*cols, 3, S, S], row-major over the grid.
    crops = big.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
    global_view = image_to_tensor(img, size).unsqueeze(0)
    return torch.cat([crops, global_view], dim=0), (rows, cols)


def cut_prompt(rows: int, cols: int, template: str, image_token: str = "<|image|>") -> str:
    """Text that replaces one image placeholder when the image is cut into rows x cols + global view.

    "v2_global" is the 240728 template, "v3_global" the 241101 one. The result always contains exactly
    rows*cols + 1 image tokens, matching `cut_image`'s output.
    """
    if template == "v2_global":
        grid = "\n".join(
            " ".join(f"subimg({i},{j}){image_token}" for j in range(cols)) for i in range(rows)
        )
        return f"Cut to {rows} rows {cols} columns with a global view\n{grid}\nglobal_view{image_token}"
    if template == "v3_global":
        grid = "\n".join(" ".join(image_token for _ in range(cols)) for _ in range(rows))
        return f"<|start_cut|>{rows}*{cols}\n{grid}\n{image_token}<|end_cut|>"
    raise ValueError(f"unknown cut template {template!r}; expected 'v2_global' or 'v3_global'")
