"""Small images of a store's rows, found through the data set that was extracted, for pages
that must open anywhere (base64 in the page itself, no path to a file on this machine).

A store holds features, not pictures, so each row is read again from the data set its
``extract`` command named (files, shard members or arrays, by stage one's own loader). A row
is shown only if its bytes are the ones its features were computed from (the sha256 recorded
per row in ``sources/sha256``): an image edited or replaced since would show a picture that is
not what the model saw, so it gets a note saying so instead.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.pipeline.data.catalog import load_dataset

THUMB_PX = 128  # the longer side; Tux Paint stamps stay recognisable, a page of 200 stays under ~2 MB


@dataclass
class Thumb:
    id: str
    uri: str | None  # data:image/...;base64,... or None when it cannot be shown
    source: str | None  # the file (or shard member) it was read from, where the data set says
    problem: str | None = None  # why there is no picture


def image_side(store: FeatureStore):
    """The data set side the store was extracted from, with the same rows; a reason (str)
    where it cannot be read from here."""
    label, data = store.attrs.get("dataset_label"), store.identity.get("dataset", {})
    try:
        side = load_dataset(label)[data["split"]].limited(data.get("limit")).side("image")
    except (FeatcacheError, KeyError, OSError, TypeError) as err:
        return (f"its data set {label!r} cannot be read from here ({getattr(err, 'message', err)}); "
                "write the page from the folder extract ran in")
    if side.ids != store.ids:
        return f"the data set {label!r} now lists other rows than the store"
    return side


def thumbnails(store: FeatureStore, rows: list[int], px: int = THUMB_PX) -> dict[int, Thumb]:
    """A thumbnail (or the reason there is none) for each of ``rows`` of an image store."""
    side = image_side(store)
    hashes = store.sources()[1] if store.has_sources else None
    out = {}
    for row in rows:
        rid = store.ids[row]
        if isinstance(side, str):
            out[row] = Thumb(rid, None, None, side)
            continue
        source = side.sources[row] if side.sources else None
        try:
            data = side.raw(row)
            if hashes is not None and hashes[row].any() and hashlib.sha256(data).digest() != hashes[row].tobytes():
                out[row] = Thumb(rid, None, source, "the image changed after its features were stored")
                continue
            image = side.decode(row, data) if side.decode is not None else side.load(row)
        except FeatcacheError as err:  # BadImage: unreadable or undecodable now
            out[row] = Thumb(rid, None, source, err.message)
            continue
        out[row] = Thumb(rid, data_uri(image, px), source)
    return out


def data_uri(image, px: int) -> str:
    """The image shrunk to ``px`` on its longer side, as an inline JPEG (decoded rows are RGB on
    white, so nothing is lost to JPEG's missing alpha)."""
    image = image.convert("RGB")
    image.thumbnail((px, px))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
