"""The one place a ``featcache extract ...`` command line is written.

Stores record the command that built them, and every "this is missing" or "rebuild it" hint
repeats one; written in three places they drifted apart (each knew other flags). Values are
shell-quoted, so a pasted ``wds:/data/{00000..00009}.tar`` reaches featcache as written.
"""

from __future__ import annotations

import re
import shlex

# preprocessing.decode as recorded -> the extract --decode that makes it (pipeline/extract/decoding.py)
DECODE_OPTIONS = {"pil-draft": "draft", "nvjpeg": "gpu", "torchvision-cpu": "gpu"}


def extract_command(model: str, dataset: str, split: str | None = None, *, layers: str = "all",
                    limit: int | None = None, pooling: str | None = None, image_size: int | None = None,
                    cache_dir=None, dtype: str | None = None, overwrite: bool = False, decode: str | None = None) -> str:
    """The extract command for one split (every split when ``split`` is None); ``decode`` "gpu" or
    "draft" for a store of JPEGs decoded that way, whose identity a whole-decoded rebuild would
    not match."""
    q = lambda value: shlex.quote(str(value))  # noqa: E731
    cmd = f"featcache extract --model {q(model)} --layers {q(layers)} --dataset {q(dataset)}"
    for flag, value in (("--split", split), ("--limit", limit), ("--pooling", pooling),
                        ("--image-size", image_size), ("--cache-dir", cache_dir)):
        cmd += f" {flag} {q(value)}" if value is not None else ""
    cmd += " --dtype float32" if dtype == "float32" else ""
    cmd += f" --decode {q(decode)}" if decode not in (None, "cpu") else ""
    return cmd + (" --overwrite" if overwrite else "")


def with_layers(command: str, layers: str) -> str:
    """A recorded command asking for other ``layers``."""
    return re.sub(r"--layers ('[^']*'|\S+)", lambda _: f"--layers {shlex.quote(layers)}", command)


def with_cache_dir(command: str, cache_dir) -> str:
    """A recorded command pointed at the cache the store was read from (a copied or moved
    cache must not be rebuilt, with --overwrite, in the folder it was copied from)."""
    flag = f"--cache-dir {shlex.quote(str(cache_dir))}"
    if re.search(r"--cache-dir ('[^']*'|\S+)", command):
        return re.sub(r"--cache-dir ('[^']*'|\S+)", lambda _: flag, command)
    return f"{command} {flag}"


def stored_command(attrs: dict, layers: str | None = None, overwrite: bool = False, cache_dir=None) -> str:
    """The extract command that built a store, from what it records of itself (a format-1 store
    records no command: it is pieced together from the identity), asking for ``layers``, for
    the cache at ``cache_dir`` when it is known."""
    command = attrs.get("command")
    if not command:
        ident = attrs.get("identity", {})
        enc, data = ident.get("encoder", {}), ident.get("dataset", {})
        command = extract_command(enc.get("name", "MODEL"), data.get("name", "DATASET"), data.get("split", "SPLIT"))
    if layers:
        command = with_layers(command, layers)
    if cache_dir is not None:
        command = with_cache_dir(command, cache_dir)
    return command + (" --overwrite" if overwrite and "--overwrite" not in command else "")


def decode_of(encoder_identity: dict | None) -> str:
    """The ``--decode`` whose stores have this encoder identity (a run's recorded training
    stores): ``draft`` for pil-draft, ``gpu`` for a GPU decoder's label, ``cpu`` when none is
    recorded. What an ``--extract`` for a run must pass, or it makes a store the run refuses."""
    label = ((encoder_identity or {}).get("preprocessing") or {}).get("decode")
    return DECODE_OPTIONS.get(label, "gpu") if label else "cpu"


def run_decode(run_cfg: dict) -> str:
    """:func:`decode_of` the image stores a run was trained on (its ``config.json``)."""
    return decode_of(run_cfg.get("cache", {}).get("train", {}).get("image", {}).get("encoder"))
