"""The heads of a model from its safetensors file, checked against what the record says they are.

A run's heads and a model folder's are read the same way (train's own classes rebuild them); a
file that does not fit its record (another run's heads copied in, a truncated file) is refused in
one line instead of failing inside torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.train.heads import AlignmentModel, fixed_model_from_state
from featcache.pipeline.train.runs import state_dim


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_heads(path: Path, head: dict, widths: dict[str, int] | None = None) -> nn.Module:
    """``head``: method, head, d_out, temperature, learn_temperature. ``widths``: the input width
    each head must take (the recorded pooled widths), checked when given."""
    from safetensors.torch import load_file

    hint = "export the run again (featcache export-model RUN DIR), or use the folder it came with"
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise FeatcacheError(f"no heads at {path}", hint) from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise FeatcacheError(f"the heads file {path} cannot be read ({type(err).__name__})", hint) from None
    try:
        if head.get("method", "heads") != "heads":  # a training-free method's fitted maps
            model = fixed_model_from_state(state, head["temperature"])
        else:
            model = AlignmentModel(head["head"], state_dim(state, "image_head"), state_dim(state, "text_head"),
                                   head["d_out"], head["temperature"], head["learn_temperature"])
            model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - a missing key, another shape: the file is not these heads
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise FeatcacheError(f"the heads in {path} do not match the model's config.json "
                             f"({head.get('head')} heads to {head.get('d_out')} dimensions): {detail}", hint) from None
    for side, want in (widths or {}).items():
        have = input_width(model, side)
        if have is not None and have != want:
            raise FeatcacheError(f"the {side} head in {path} takes {have} features, but the model's {side} layer "
                                 f"has {want}", hint)
    return model.eval()


def input_width(model: nn.Module, side: str) -> int | None:
    """The width a side's head reads: a linear head's or an MLP's projection, an affine map's
    (d_in, d_out) weight, a relative map's anchors."""
    head = getattr(model, f"{side}_head")
    if isinstance(head, nn.Linear):
        return int(head.weight.shape[1])
    if hasattr(head, "proj"):
        return int(head.proj.weight.shape[1])
    if hasattr(head, "anchors"):
        return int(head.anchors.shape[1])
    return int(head.weight.shape[0]) if hasattr(head, "weight") else None
