"""Adapters for users' own data: pair tables, COCO and Karpathy JSON, image folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.datasets import CLASSES, PAIRS, Split, TextSide, file_images, hash_split, prompt_side, read_list

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".svg"}
DEFAULT_TEMPLATES = ["a photo of a {}."]


def load_path(path: Path, options: dict) -> dict[str, Split]:
    if path.is_dir():
        return image_folder(path, options)
    if path.suffix in (".csv", ".jsonl"):
        return pair_table(path, options)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "annotations" in data:
            return coco_captions(path, data, options)
        if isinstance(data, dict) and "images" in data:
            return karpathy(path, data, options)
    raise FeatcacheError(f"cannot read {path} as a data set",
                         "expected .csv/.jsonl (image,caption[,split]), COCO or Karpathy .json, or a folder")


def _pairs(name: str, rows: list[tuple[str, Path, str, str]]) -> dict[str, Split]:
    """rows: (image id, image path, caption, split) -> splits storing each image once."""
    out = {}
    for split in sorted({r[3] for r in rows}):
        image_ids, paths, seen = [], [], set()
        cap_ids, cap_groups, captions = [], [], []
        for image_id, image_path, caption, s in rows:
            if s != split:
                continue
            if image_id not in seen:
                seen.add(image_id)
                image_ids.append(image_id)
                paths.append(image_path)
            cap_ids.append(f"{image_id}#{len(cap_ids)}")
            cap_groups.append(image_id)
            captions.append(caption)
        images = file_images(paths, image_ids, image_ids)
        out[split] = Split(name, split, PAIRS, images, TextSide(cap_ids, cap_groups, captions))
    return out


def pair_table(path: Path, options: dict) -> dict[str, Split]:
    salt = options.get("salt", "")
    with open(path, encoding="utf-8") as f:
        records = list(csv.DictReader(f)) if path.suffix == ".csv" else [json.loads(l) for l in f if l.strip()]
    rows = []
    for n, rec in enumerate(records, 1):
        if "image" not in rec or "caption" not in rec:
            raise FeatcacheError(f"{path}: row {n} lacks an 'image' or 'caption' column")
        image = str(rec["image"])
        split = rec.get("split") or hash_split(image, salt)
        rows.append((image, (path.parent / image), str(rec["caption"]), split))
    return _pairs(path.stem, rows)


def coco_captions(path: Path, data: dict, options: dict) -> dict[str, Split]:
    root = Path(options.get("images", path.parent))
    split = options.get("split", "train" if "train" in path.name else "val")
    files = {img["id"]: img["file_name"] for img in data["images"]}
    rows = [(files[a["image_id"]], root / files[a["image_id"]], a["caption"].strip(), split)
            for a in sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"]))]
    return _pairs(path.stem, rows)


def karpathy(path: Path, data: dict, options: dict) -> dict[str, Split]:
    root = Path(options.get("images", path.parent))
    rows = []
    for img in data["images"]:
        rel = Path(img.get("filepath", "")) / img["filename"]
        split = "train" if img["split"] == "restval" else img["split"]
        for sent in img["sentences"]:
            rows.append((rel.as_posix(), root / rel, sent["raw"].strip(), split))
    return _pairs(path.stem, rows)


def image_folder(path: Path, options: dict) -> dict[str, Split]:
    """<root>/<class>/<image> (one split, "test"), or <root>/<split>/<class>/<image>."""
    templates = DEFAULT_TEMPLATES
    if options.get("templates"):
        templates = read_list(Path(options["templates"]), "templates")
    split_dirs = [d for d in sorted(path.iterdir()) if d.is_dir() and d.name in ("train", "val", "test")]
    roots = {d.name: d for d in split_dirs} or {"test": path}
    classnames = sorted({c.name for r in roots.values() for c in r.iterdir() if c.is_dir()})
    if not classnames:
        raise FeatcacheError(f"{path} has no class subfolders")
    out = {}
    for split, root in roots.items():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        ids = [p.relative_to(root).as_posix() for p in files]
        groups = [p.relative_to(root).parts[0].replace("_", " ") for p in files]
        names = [c.replace("_", " ") for c in classnames]
        out[split] = Split(path.name, split, CLASSES, file_images(files, ids, groups),
                           prompt_side(names, templates), names, templates)
    return out
