"""Build an :class:`~featcache.pipeline.encoders.Encoder` from any transformers encoder.

What is hooked is found from the model itself, not from a list of architectures: the blocks are
the ``ModuleList`` with ``config.num_hidden_layers`` entries (``encoder.layer`` in BERT and
DINOv2, ``layers`` in ViT, ``encoder.layers`` in CLIP and SigLIP towers), ``embed`` is what
enters the first block (the ``hidden_states[0]`` of ``output_hidden_states``), and ``final`` is
a norm applied to the whole token sequence after the last block, where the model has one.

Preprocessing is the model's own image processor (from ``preprocessor_config.json``): a
featcache store must hold what the model would have seen, so size, resize rule, crop, rescale,
mean and std are the processor's, unless ``--image-size`` overrides the size.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
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
    probe_forward,
)
from featcache.pipeline.extract.registry import EncoderEntry, network_error

# Names of a norm over the token sequence after the last block, in the families featcache knows.
FINAL_NORMS = ("layernorm", "post_layernorm", "final_layer_norm", "norm", "ln_post", "ln_f")


# Files that hold a tokenizer; a text model folder with none of them has no vocabulary of its own.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load(entry: EncoderEntry, source: str, image_size: int | None):
    model, missing = _from_pretrained(entry, source)
    config = model.config
    blocks = _blocks(model, entry)
    taps = {"embed": Tap(blocks[0], "input")}
    taps.update({block_name(i): Tap(blk, "output") for i, blk in enumerate(blocks)})
    final = _final_norm(model)
    if final is not None:
        taps["final"] = Tap(final, "output")
    if entry.modality == "text":
        tokenizer = _tokenizer(entry, source)
        prep = {"tokenizer": type(tokenizer).__name__, "max_length": _max_length(entry, tokenizer, config),
                "vocab_size": tokenizer.vocab_size}
        return Encoder(entry, model, taps, config.hidden_size, 0, prep, torch.device("cpu"), tokenizer,
                       uninitialised=sorted(missing), files_digest=config_digest(config, tokenizer))
    size = image_size or entry.default_image_size
    prep, processor = image_preprocessing(entry, source, config, size)
    # what no --image-size means; the processor is built and probed again only when it differs
    try:
        default = entry.default_image_size or (image_preprocessing(entry, source, config, None)[0]["image_size"]
                                               if size else prep["image_size"])
    except FeatcacheError:  # no usable default (a non-square [h, w]): only an explicit --image-size works
        default = None
    return Encoder(entry, model, taps, config.hidden_size, _prefix_tokens(model, config), prep, torch.device("cpu"),
                   native_image_size=getattr(config, "image_size", None), default_image_size=default,
                   uninitialised=sorted(missing), processor=processor,
                   forward_kwargs=_size_kwargs(model, config, prep["image_size"]),
                   files_digest=config_digest(config))


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
    except Exception as err:  # noqa: BLE001 - transformers and safetensors raise their own types
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        hint = ("the weights belong to another configuration: check config.json" if "size mismatch" in str(err)
                or "mismatched_sizes" in str(err) else
                "the weights file is damaged or truncated: copy or download it again")
        raise FeatcacheError(f"{entry.name}: its weights cannot be loaded ({type(err).__name__}: {text})", hint) from None
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


def _final_norm(model: nn.Module) -> nn.Module | None:
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
        probe_forward(model.eval())
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
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_local(source), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise FeatcacheError(f"{entry.name}: its tokenizer cannot be loaded ({str(err).splitlines()[0][:160]})",
                             "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)") from None
    if tokenizer.pad_token is None:  # batches are padded; the attention mask keeps pads out of every layer
        stand_in = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if stand_in is None:
            raise FeatcacheError(f"{entry.name}: its tokenizer has no padding token, nor an end or unknown token "
                                 "to pad with", "set pad_token in tokenizer_config.json")
        tokenizer.pad_token = stand_in
    return tokenizer


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


def image_preprocessing(entry: EncoderEntry, source: str, config, size: int | None) -> tuple[dict, object | None]:
    """What the model sees of an image, and the processor that makes it (None: featcache's own).

    With a ``preprocessor_config.json``, transformers' own image processor does the work (its
    resize rule, crop, rescale and normalisation, whatever its class), so a store holds what the
    model would have seen; ``size`` (``--image-size``) replaces its output size, keeping its ratio
    of resize to crop (DINOv2's 256 -> 224). Without one: the model's ``image_size``, a bicubic
    shorter-side resize, a centre crop and ImageNet's mean and std.
    """
    if size == -1:
        size = getattr(config, "image_size", None)
    if not _processor_config(source):
        size = size or getattr(config, "image_size", 224)
        check_image_size(size, _patch(config))
        return {"image_size": size, "resize": "shorter-side bicubic", "crop": "center", "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "background": "white"}, None
    processor = _image_processor(entry, source, size)
    side = _output_side(entry, processor)
    check_image_size(side, _patch(config))
    settings = json.loads(json.dumps(processor.to_dict(), sort_keys=True, default=str))
    return {"image_size": side, "processor": type(processor).__name__, "processor_settings": settings,
            "background": "white"}, processor


def _image_processor(entry: EncoderEntry, source: str, size: int | None):
    from transformers import AutoImageProcessor

    try:
        with _quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=_local(source),
                                                           trust_remote_code=False, backend="pil")
            if size:
                processor = AutoImageProcessor.from_pretrained(source, local_files_only=_local(source),
                                                               trust_remote_code=False, backend="pil",
                                                               **_resized(processor, size))
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad processor config
        raise FeatcacheError(f"{entry.name}: its preprocessor_config.json cannot be used ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160] if str(err) else ''})",
                             "fix the processor config (save it with the model's image processor), or remove it "
                             "to use ImageNet defaults") from None
    return processor


def _field(value, key):
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def _resized(processor, side: int) -> dict:
    """Processor settings whose output is ``side`` x ``side``, in the processor's own terms."""
    size, crop = processor.size, getattr(processor, "crop_size", None)
    edge = _field(size, "shortest_edge") or _field(size, "height")
    if getattr(processor, "do_center_crop", False) and crop and _field(crop, "height"):
        scaled = round(side * edge / _field(crop, "height")) if edge else side
        key = "shortest_edge" if _field(size, "shortest_edge") else None
        return {"crop_size": {"height": side, "width": side},
                "size": {"shortest_edge": scaled} if key else {"height": scaled, "width": scaled}}
    if _field(size, "shortest_edge"):
        return {"size": {"shortest_edge": side}, "do_center_crop": True, "crop_size": {"height": side, "width": side}}
    return {"size": {"height": side, "width": side}}


def _output_side(entry: EncoderEntry, processor) -> int:
    """The processor run once on a blank image: its output must be square and finite."""
    from PIL import Image

    try:
        pixels = processor(images=[Image.new("RGB", (7, 5), "white")], return_tensors="np")["pixel_values"]
    except Exception as err:  # noqa: BLE001 - a bad mean, std or size surfaces here, not in the middle of a run
        raise FeatcacheError(f"{entry.name}: its image processor fails on an image ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160] if str(err) else ''})",
                             "fix preprocessor_config.json (size, mean and std)") from None
    height, width = pixels.shape[-2:]
    if height != width:
        raise FeatcacheError(f"{entry.name}: its image processor makes {height} x {width} images; featcache stores "
                             "square inputs", "pass --image-size N for N x N inputs")
    if not np.isfinite(pixels).all():
        raise FeatcacheError(f"{entry.name}: its image processor makes non-finite pixels (a zero in image_std?)",
                             "fix image_mean and image_std in preprocessor_config.json")
    return int(height)


def config_digest(config, tokenizer=None) -> str:
    """sha256 of what else than the weights defines the features: the model config (its numbers,
    not where it was loaded from or which transformers wrote it) and, for text, the tokenizer's
    vocabulary, rules and special tokens."""
    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                             "_attn_implementation_autoset")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else
                 json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


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


def _patch(config) -> int:
    patch = getattr(config, "patch_size", 1)
    return patch[0] if isinstance(patch, (tuple, list)) else int(patch)
