"""Build an :class:`~featcache.pipeline.encoders.Encoder` from any transformers encoder.

What is hooked is found from the model itself, not from a list of architectures: the blocks are
the ``ModuleList`` with ``config.num_hidden_layers`` entries (``encoder.layer`` in BERT and
DINOv2, ``layers`` in ViT, ``encoder.layers`` in CLIP and SigLIP towers), ``embed`` is what
enters the first block (the ``hidden_states[0]`` of ``output_hidden_states``), and ``final`` is
a norm applied to the whole token sequence after the last block, where the model has one.

Preprocessing comes from the model's own ``preprocessor_config.json``: a featcache store must
hold what the model would have seen, so size, resize rule, crop, mean and std are the
processor's, unless ``--image-size`` overrides the size.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.layerspec import block_name
from featcache.pipeline.extract.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Tap,
    check_image_size,
    dummy_inputs,
)
from featcache.pipeline.extract.registry import EncoderEntry, network_error

# Names of a norm over the token sequence after the last block, in the families featcache knows.
FINAL_NORMS = ("layernorm", "post_layernorm", "final_layer_norm", "norm", "ln_post", "ln_f")


# PIL's resampling codes as transformers' processors record them.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# Files that hold a tokenizer; a text model folder with none of them has no vocabulary of its own.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load(entry: EncoderEntry, source: str, image_size: int | None):
    model, missing = _from_pretrained(entry, source)
    config = model.config
    blocks = _blocks(model, entry)
    taps = {"embed": Tap(blocks[0], "input")}
    taps.update({block_name(i): Tap(blk, "output") for i, blk in enumerate(blocks)})
    final = _final_norm(model, config.hidden_size)
    if final is not None:
        taps["final"] = Tap(final, "output")
    if entry.modality == "text":
        tokenizer = _tokenizer(entry, source)
        prep = {"tokenizer": type(tokenizer).__name__, "max_length": _max_length(entry, tokenizer, config),
                "vocab_size": tokenizer.vocab_size}
        return Encoder(entry, model, taps, config.hidden_size, 0, prep, torch.device("cpu"), tokenizer,
                       uninitialised=sorted(missing))
    prep = image_preprocessing(source, config, image_size or entry.default_image_size)
    default = entry.default_image_size or image_preprocessing(source, config, None)["image_size"]
    return Encoder(entry, model, taps, config.hidden_size, _prefix_tokens(model, config), prep, torch.device("cpu"),
                   native_image_size=getattr(config, "image_size", None), default_image_size=default,
                   uninitialised=sorted(missing),
                   forward_kwargs=_size_kwargs(model, config, prep["image_size"]))


def _local(source: str) -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or Path(source).exists()


def _from_pretrained(entry: EncoderEntry, source: str) -> tuple[nn.Module, set[str]]:
    """The model and the names of the parameters the checkpoint lacked (the loader made them up).

    ``trust_remote_code=False``: a folder whose config names its own Python code is refused, never
    run, even if someone answers transformers' prompt.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # featcache draws its own progress
    try:
        with _quiet_transformers():
            model, info = AutoModel.from_pretrained(source, local_files_only=_local(source), trust_remote_code=False,
                                                    output_loading_info=True)
    except OSError as err:
        raise network_error(entry, err) from None
    except ValueError as err:  # a model that needs its own code, or an unknown model type
        raise FeatcacheError(f"{entry.name}: transformers cannot build this model ({str(err).splitlines()[0][:200]})",
                             "featcache loads standard transformers architectures and never runs a model "
                             "folder's own code; see docs/data.md") from None
    if info.get("mismatched_keys"):
        name = sorted(info["mismatched_keys"])[0]
        name = name[0] if isinstance(name, tuple) else name
        raise FeatcacheError(f"{entry.name}: the checkpoint's tensor {name} has another shape than "
                             f"{type(model).__name__} expects ({len(info['mismatched_keys'])} such)",
                             "the weights belong to another configuration: check config.json")
    return model, set(info.get("missing_keys") or ())


class _quiet_transformers:
    """transformers 5 prints a load report for every model with a missing key: featcache
    summarises those itself, in one line (``Encoder.check_initialised``)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)


def _blocks(model: nn.Module, entry: EncoderEntry) -> nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and n]
    if not lists:
        raise FeatcacheError(f"{entry.name}: {type(model).__name__} gives no hidden states featcache can hook "
                             "(no list of num_hidden_layers blocks)",
                             "use a transformers encoder whose forward returns hidden_states: ViT, DINOv2, CLIP or "
                             "SigLIP towers, BERT, RoBERTa, MPNet, XLM-R")
    return min(lists, key=lambda item: item[0].count("."))[1]


def _final_norm(model: nn.Module, width: int) -> nn.Module | None:
    """A norm child of the model's body over the whole sequence; a norm of the pooled token only
    (CLIP vision's ``post_layernorm``) is not a layer of every token and is left out by the probe."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in FINAL_NORMS and name.count(".") <= 1 and isinstance(module, nn.LayerNorm):
            if not any(isinstance(m, nn.ModuleList) for m in module.modules()) and _sequence_norm(model, module):
                return module
    return None


def _sequence_norm(model: nn.Module, norm: nn.Module) -> bool:
    """Does ``norm`` run on the token sequence in a forward pass? Known from the model's source
    code would be guesswork; one tiny forward pass tells."""
    seen = []
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.append(out.dim()))
    try:
        with torch.inference_mode():
            model.eval()(**dummy_inputs(model))
    except Exception:  # noqa: BLE001 - a model that cannot take the probe keeps no final layer
        return False
    finally:
        handle.remove()
    return bool(seen) and seen[-1] == 3


def _prefix_tokens(model: nn.Module, config) -> int:
    """Tokens before the patches: a CLS token (and DINOv2's registers); SigLIP has none."""
    emb = getattr(model, "embeddings", None)
    has_cls = any(hasattr(emb, a) for a in ("cls_token", "class_embedding"))
    return int(has_cls) + int(getattr(config, "num_register_tokens", 0) or 0)


def _size_kwargs(model: nn.Module, config, size: int) -> dict:
    """ViT and CLIP interpolate their position embeddings only when asked."""
    native = getattr(config, "image_size", size)
    if size != native and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        return {"interpolate_pos_encoding": True}
    return {}


def _tokenizer(entry: EncoderEntry, source: str):
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise FeatcacheError(f"{entry.name}: the model folder {source} holds no tokenizer "
                             f"(none of {', '.join(TOKENIZER_FILES)})",
                             "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=_local(source), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise FeatcacheError(f"{entry.name}: its tokenizer cannot be loaded ({str(err).splitlines()[0][:160]})",
                             "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)") from None


def _max_length(entry: EncoderEntry, tokenizer, config) -> int:
    """The registry's length, capped by what the model can take (CLIP's text tower: 77)."""
    limits = [entry.max_length]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        limits.append(tokenizer.model_max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if positions:  # RoBERTa-style models reserve pad_token_id + 1 positions
        offset = (getattr(config, "pad_token_id", 0) or 0) + 1 if config.model_type in ("roberta", "xlm-roberta",
                                                                                        "camembert") else 0
        limits.append(positions - offset)
    return min(limits)


def image_preprocessing(source: str, config, size: int | None) -> dict:
    """The processor's resize, crop and normalisation; ``size`` (``--image-size``) replaces its
    output size, keeping the ratio of resize to crop (DINOv2's 256 -> 224)."""
    proc = _processor_config(source)
    crop = _edge(proc.get("crop_size")) if proc.get("do_center_crop", "crop_size" in proc) else None
    resize = _edge(proc.get("size"))
    square = isinstance(proc.get("size"), dict) and "height" in proc["size"] and crop is None
    native = crop or resize or getattr(config, "image_size", 224)
    if size == -1:
        size = getattr(config, "image_size", native)
    size = size or native
    check_image_size(size, _patch(config))
    prep = {"image_size": size,
            "resize": f"{'square' if square else 'shorter-side'} {RESAMPLE.get(proc.get('resample', 3), 'bicubic')}",
            "crop": "none" if square else "center",
            "mean": list(proc.get("image_mean", IMAGENET_MEAN)), "std": list(proc.get("image_std", IMAGENET_STD)),
            "background": "white"}
    if crop and resize and resize != crop:
        prep["resize_size"] = round(size * resize / crop)
    return prep


def _processor_config(source: str) -> dict:
    path = Path(source) / "preprocessor_config.json"
    if not path.exists() and not Path(source).exists():
        try:
            from transformers.utils import cached_file

            found = cached_file(source, "preprocessor_config.json", local_files_only=True,
                                _raise_exceptions_for_missing_entries=False)
            path = Path(found) if found else path
        except (OSError, ValueError):
            pass
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FeatcacheError(f"cannot read the processor config {path} ({type(err).__name__}: {err})",
                             "fix the JSON file, or remove it to use ImageNet defaults") from None
    return data if isinstance(data, dict) else {}


def _edge(size) -> int | None:
    """A processor's size field: an int, or a dict with shortest_edge or height/width."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("shortest_edge") or size.get("height")
    return None


def _patch(config) -> int:
    patch = getattr(config, "patch_size", 1)
    return patch[0] if isinstance(patch, (tuple, list)) else int(patch)
