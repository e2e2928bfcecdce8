"""Image bytes to RGB as a viewer shows them: PNG, JPEG, 16-bit, SVG (with its entities inlined)."""

from __future__ import annotations

import io
import math
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError


# -- decoding -------------------------------------------------------------------------------
class BadImage(FeatcacheError):
    """An image file that cannot be decoded."""


_ENTITY = re.compile(rb'<!ENTITY\s+(\w+)\s+"([^"&<%]*)"\s*>')


_DOCTYPE = re.compile(rb"<!DOCTYPE[^\[>]*(\[.*?\])?\s*>", re.S)


MAX_SVG_EXPANSION = 4  # an SVG's inlined entities may make it at most this many times larger


def _expand_svg_entities(data: bytes) -> bytes:
    """Inline the plain string entities that Illustrator writes (``&ns_svg;``), in one pass.

    cairosvg rightly refuses entity declarations; expanding only literal strings, once,
    keeps that protection (no external or nested entities) while reading such files.
    """
    doctype = _DOCTYPE.search(data)
    if not doctype:
        return data
    entities = dict(_ENTITY.findall(doctype.group(0)))
    body = data[: doctype.start()] + data[doctype.end():]
    # A few hundred KB of references to a long entity would expand to gigabytes: bound the result
    # before building it (Illustrator's entities are namespace URLs, a few hundred bytes in all).
    grown = sum(len(entities.get(m.group(1), m.group(0))) - len(m.group(0)) for m in re.finditer(rb"&(\w+);", body))
    if len(body) + grown > max(MAX_SVG_EXPANSION * len(data), 1 << 20):
        raise ValueError(f"its entities would expand it to {(len(body) + grown) >> 20} MB (more than "
                         f"{MAX_SVG_EXPANSION} times its size)")
    return re.sub(rb"&(\w+);", lambda m: entities.get(m.group(1), m.group(0)), body)


# Elements that cairosvg renders on a surface of their own size (the canvas, nested viewports,
# masks, patterns, markers, embedded images): a mask is rasterised at its full size before it
# is scaled, so a 20,000-pixel mask took 1.6 GB and 3 s, and larger ones longer or a kill.
SVG_SURFACES = {"svg": ("width", "height"), "symbol": ("width", "height"), "image": ("width", "height"),
                "mask": ("width", "height"), "pattern": ("width", "height"),
                "marker": ("markerWidth", "markerHeight")}


def max_image_pixels() -> int | None:
    """PIL's decompression-bomb limit: PIL refuses images above twice ``Image.MAX_IMAGE_PIXELS``
    (read when called, so a user who raises it for their PNGs raises it for SVGs too; None: off)."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def svg_surface_sizes(tree) -> list[tuple[str, float, float]]:
    """(tag, width, height) in pixels at 96 dpi of every element that gets a surface of its own,
    the root canvas first, as cairosvg reads them (units, viewBox fallback), without rendering.
    Percentages count as 0 here: they are shares of an enclosing size that is itself measured."""
    from types import SimpleNamespace

    from cairosvg.helpers import node_format, size

    # size() needs only these of a surface: the dpi, 1em (cairosvg's 12pt), and a context for %.
    probe = SimpleNamespace(dpi=96, font_size=16.0, context_width=None, context_height=None)
    width, height, _ = node_format(probe, tree)
    out, stack = [(tree.tag, width, height)], list(tree.children)
    while stack:
        node = stack.pop()
        stack.extend(getattr(node, "children", ()))
        keys = SVG_SURFACES.get(node.tag)
        if keys and all(node.get(key) for key in keys):
            out.append((node.tag, size(probe, node.get(keys[0]), "x"), size(probe, node.get(keys[1]), "y")))
    return out


def check_svg_canvas(tree) -> None:
    """Refuse, before anything is rasterised, an SVG whose canvas (or a mask, pattern or other
    surface in it) holds more pixels than PIL lets a PNG or JPEG have. cairosvg has no such
    check: a 10^6 x 10^6 canvas otherwise renders, or allocates until the kernel steps in."""
    limit = max_image_pixels()
    if limit is None:
        return
    for i, (tag, width, height) in enumerate(svg_surface_sizes(tree)):
        if abs(width) * abs(height) > limit:
            what = "canvas" if i == 0 else f"<{tag}>"
            raise ValueError(f"its {what} is {width:,.0f} x {height:,.0f} pixels, more than the {limit:,} "
                             "that PIL's decompression-bomb check allows (PIL.Image.MAX_IMAGE_PIXELS)")


def render_svg(data: bytes, width: int = 512) -> bytes:
    """An SVG as PNG bytes ``width`` pixels wide: entities inlined (bounded), its canvas and
    surfaces checked against PIL's pixel limit, and only then rasterised."""
    import cairosvg
    from cairosvg.parser import Tree

    data = _expand_svg_entities(data)
    check_svg_canvas(Tree(bytestring=data))
    return cairosvg.svg2png(bytestring=data, output_width=width)


# The shorter side JPEGs are drafted to (``extract --decode draft``), or None: decoded whole. A
# setting of the run, not of the data set: every adapter's decoding closure calls decode_image,
# so the one place that knows the run (the decoding worker) sets it around its rows.
_DRAFT_SIZE: ContextVar[int | None] = ContextVar("featcache_jpeg_draft", default=None)


@contextmanager
def jpeg_draft(size: int | None):
    """Within this block, :func:`decode_image` decodes a JPEG with libjpeg's DCT scaling at the
    smallest of 1/8, 1/4, 1/2 or 1 that keeps its shorter side at least ``size`` (None: whole)."""
    token = _DRAFT_SIZE.set(size)
    try:
        yield
    finally:
        _DRAFT_SIZE.reset(token)


def draft_request(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) to ask PIL's ``draft`` for: it picks the largest scale that leaves the
    image at least this big on both sides, so the shorter side stays at least ``size``."""
    short = min(width, height)
    if short <= size:
        return width, height
    return math.ceil(width * size / short), math.ceil(height * size / short)


def decode_image(data: bytes, source: str):
    """Decode PNG/JPEG/SVG bytes to RGB as a viewer shows them: EXIF orientation applied,
    16-bit channels scaled (not clipped) to 8 bits, transparency composited on white."""
    from PIL import Image, ImageOps

    try:
        if source.lower().endswith(".svg"):
            data = render_svg(data)
        img = Image.open(io.BytesIO(data))
        draft = _DRAFT_SIZE.get()
        if draft is not None and img.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with more pictures after it
            img.draft(None, draft_request(*img.size, draft))  # only JPEGs scale while decoding
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # PIL and cairosvg raise many types for bad files
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", Path(source).name, str(err))
        raise BadImage(f"cannot decode image {source}: {type(err).__name__}: {detail}",
                       "fix or remove the file, or pass --skip-bad to record it as a missing row") from None
    return as_viewed(img)


def as_viewed(img):
    """A decoded PIL image as ``decode_image`` returns it (16-bit scaled, transparency on white,
    RGB): images handed over already decoded (``AlignedModel.encode_image``) go through the same
    steps as files, so they give the features a cached file would."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(wide * 255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")
