"""Inputs to the stored layer's features through stage one's own code: the encoder's
``prepare_images``/``prepare_texts`` and ``forward`` (taps, pooling, autocast on CUDA), then
rounded to the store's dtype. Nothing of that path is written again here, so the features of a
new input are the ones a cache of it would hold; only the batching is this module's."""

from __future__ import annotations

from typing import Callable

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.data.decode import BadImage, jpeg_draft
from featcache.pipeline.extract.decoding import draft_size
from featcache.pipeline.extract.encoders import Encoder
from featcache.pipeline.model.inputs import image_name, load_image
from featcache.pipeline.model.spec import SideSpec

FP16_MAX = 65504.0


def image_features(encoder: Encoder, side: SideSpec, items: list, batch_size: int, skip_bad: bool = False,
                   advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
    """(rows, width) features in the store's dtype and the positions of inputs that could not be
    decoded (their rows NaN, as a store's missing rows are); without ``skip_bad`` the first such
    input stops the call, named."""
    out = np.full((len(items), encoder.pooled_width(side.pooling)), np.nan, dtype=side.dtype)
    bad: list[int] = []
    draft = draft_size(encoder)  # a model trained on --decode draft stores drafts its files too
    for start in range(0, len(items), batch_size):
        rows, images = [], []
        for i in range(start, min(len(items), start + batch_size)):
            try:
                with jpeg_draft(draft):
                    images.append(load_image(items[i]))
                rows.append(i)
            except BadImage as err:
                if not skip_bad:
                    raise FeatcacheError(err.message, "fix or remove it, or pass --skip-bad (skip_bad=True) to "
                                                      "go on without it") from None
                bad.append(i)
        if images:
            pixels = encoder.prepare_images(images)
            out[rows] = _stored(encoder, side, encoder.forward(pixels, [side.layer], side.pooling)[side.layer],
                                [image_name(items[i], i) for i in rows])
        if advance:
            advance(min(len(items), start + batch_size) - start)
    return out, bad


def text_features(encoder: Encoder, side: SideSpec, texts: list[str], batch_size: int,
                  advance: Callable[[int], None] | None = None) -> np.ndarray:
    out = np.empty((len(texts), encoder.pooled_width(side.pooling)), dtype=side.dtype)
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        values = encoder.forward(encoder.prepare_texts(batch), [side.layer], side.pooling)[side.layer]
        out[start:start + len(batch)] = _stored(encoder, side, values, [repr(t[:40]) for t in batch])
        if advance:
            advance(len(batch))
    return out


def _stored(encoder: Encoder, side: SideSpec, values, names: list[str]) -> np.ndarray:
    """The values as a store would hold them, refused where a store would refuse them."""
    values = values.float().cpu().numpy()
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise FeatcacheError(f"layer {side.layer} of {encoder.name} is not finite (NaN or inf) for "
                             f"{names[int(np.flatnonzero(~finite)[0])]}", "check the model's weights")
    if side.dtype == "float16" and np.abs(values).max(initial=0) > FP16_MAX:
        raise FeatcacheError(f"layer {side.layer} of {encoder.name} exceeds the float16 range for these inputs",
                             "the run's store held float16; its heads cannot read these values")
    return values.astype(side.dtype)
