"""A side's encoder loaded by stage one's own loader, then held to the identity the model recorded.

The heads learned to read features of particular weights, preprocessing and pooling. Other
weights under the same name (a re-downloaded hub model, an edited folder) would give embeddings
that look fine and mean nothing, so every recorded field is compared, and the first that differs
is named in one line. An encoder that cannot be loaded at all says which it is and where it was.
"""

from __future__ import annotations

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.extract import decoding
from featcache.pipeline.extract.encoders import Encoder
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.model.spec import SideSpec

# The identity fields that define the features (name and library versions do not).
CHECKED = ("modality", "weights_sha256", "files_sha256", "preprocessing", "pooling", "layers")


def load_side(side: SideSpec, device: str = "auto", model: str | None = None) -> Encoder:
    """The encoder of ``side`` on ``device``; ``model`` points at the same weights elsewhere (a
    colleague's copy): its identity is checked the same way."""
    spec = model or side.model
    try:
        encoder = load_encoder(spec, device, side.image_size)
    except FeatcacheError as err:
        where = f", whose weights were at {side.where}" if side.where and not model else ""
        raise FeatcacheError(
            f"the {side.modality} encoder {spec}{where} cannot be loaded on this machine: {err.message}",
            (err.hint + "; or " if err.hint else "") + f"point at a copy of the same weights with "
            f"{side.modality}_model=... (--{side.modality}-model); its sha256 "
            f"{side.identity.get('weights_sha256', '?')[:12]} is checked") from None
    if side.identity.get("preprocessing", {}).get("decode") == decoding.DRAFT_LABEL:
        decoding.apply(encoder, "draft")  # decoded as its stores were: JPEG files drafted, then checked
    check_identity(side, encoder, spec)
    return encoder


def check_identity(side: SideSpec, encoder: Encoder, spec: str) -> None:
    """Refuse an encoder whose features would differ from the recorded ones, naming the field."""
    encoder.check_pooling(side.pooling)
    if side.layer not in encoder.layer_names:
        raise FeatcacheError(f"the {side.modality} encoder {spec} has no layer {side.layer} "
                             f"(it has {', '.join(encoder.layer_names)})", "load the encoder the run was trained on")
    here = encoder.identity(side.pooling)
    for name in CHECKED:
        if name not in side.identity or (name == "files_sha256" and name not in here):
            continue  # a field the record predates is checked on what it did record
        if side.identity[name] != here.get(name):
            raise FeatcacheError(
                f"the {side.modality} encoder {spec} on this machine differs from the one the heads were trained "
                f"on: {name} (recorded {_short(side.identity[name])}, here {_short(here.get(name))})",
                "load the same weights and options, or train a run on this encoder's features")


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."
