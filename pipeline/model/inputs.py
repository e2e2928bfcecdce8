"""New images as stage one sees its rows: paths are read and decoded by ``decode_image``, decoded
images (PIL, arrays, tensors) go through the same viewer steps (orientation, 16-bit, transparency
on white, RGB). Equal inputs then give the features a cached row holds, except that a run of
``--decode draft`` stores drafts only files: an image handed over decoded was decoded whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.pipeline.data.decode import BadImage, as_viewed, decode_image


def load_image(item):
    """A path, PIL image, HWC uint8 array or CHW tensor (uint8, or float in [0, 1]) as RGB PIL;
    a file that cannot be read or decoded is a ``BadImage`` naming it."""
    from PIL import Image, ImageOps

    if isinstance(item, (str, Path)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BadImage(f"cannot read image {path}: {err.strerror or type(err).__name__}",
                           "check the path, or pass --skip-bad to leave it out") from None
        return decode_image(data, str(path))
    if isinstance(item, Image.Image):
        return as_viewed(ImageOps.exif_transpose(item))
    if hasattr(item, "detach"):  # a torch tensor, as torchvision gives images: CHW
        from torchvision.transforms.functional import to_pil_image

        return as_viewed(to_pil_image(item.detach().cpu()))
    if isinstance(item, np.ndarray):
        return as_viewed(Image.fromarray(item))
    raise BadImage(f"cannot use a {type(item).__name__} as an image",
                   "pass file paths, PIL images, HWC uint8 arrays or CHW tensors")


def image_items(images) -> list:
    """A batch (an (N, C, H, W) tensor or (N, H, W, C) array) is N images; one path, PIL image,
    array or tensor is one; anything else is a sequence of images."""
    from PIL import Image

    if hasattr(images, "detach") or isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images)


def image_name(item, index: int) -> str:
    """How an input is named in messages and output ids: its path, else its position."""
    return str(item) if isinstance(item, (str, Path)) else f"#{index}"
