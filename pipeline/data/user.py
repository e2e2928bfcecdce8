"""Adapters for users' own data: pair tables, COCO and Karpathy JSON, image folders."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.names import hash_split
from featcache.pipeline.data import clipbench_wds
from featcache.pipeline.data.rows import CLASSES, PAIRS, Split, TextSide, file_images, prompt_side, read_list

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".svg"}


DEFAULT_TEMPLATES = ["a photo of a {}."]


def load_path(path: Path, options: dict) -> dict[str, Split]:
    if options.get("clip_benchmark"):  # a torchvision data set CLIP_benchmark builds from this root
        from featcache.pipeline.data.clipbench_tv import load_clipbench_tv

        return load_clipbench_tv(path, options)
    if clipbench_wds.is_layout(path):
        return clipbench_wds.load_clipbench_wds(path, options)
    if path.is_dir():
        return image_folder(path, options)
    if path.suffix in (".csv", ".jsonl"):
        return pair_table(path, options)
    if path.suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return coco_captions(path, data, options)
        if isinstance(data, dict) and "images" in data:
            return karpathy(path, data, options)
    raise FeatcacheError(f"cannot read {path} as a data set: it is neither a COCO captions file (with "
                         "'annotations') nor a Karpathy split file (with 'images')" if path.suffix == ".json" else
                         f"cannot read {path} as a data set",
                         "expected .csv/.jsonl (image,caption[,split]), COCO or Karpathy .json, or a folder")


def _pairs(path: Path, rows: list[tuple[str, Path, str | None, str, str]]) -> dict[str, Split]:
    """rows: (image id, image path, caption or None, split, where) -> splits storing each image once.

    A row without a usable caption is kept as a flagged text row: extraction stops on it, or
    records it as missing with --skip-bad, as it does for an undecodable image.
    """
    if not rows:
        raise _bad_file(path, "", "holds no rows", "a pair file needs at least one image,caption row")
    split_of: dict[str, tuple[str, str]] = {}
    for image_id, image_path, _, split, where in rows:
        # The file itself, however it is spelled (./a.png, a.png, a link to it): one image, one split.
        first = split_of.setdefault(os.path.realpath(image_path), (split, where))
        if first[0] != split:
            raise _bad_file(path, "", f"the image {image_id} is in two splits, {first[0]!r} ({first[1]}) and "
                                      f"{split!r} ({where}); the test split would leak into training",
                            "give every row of an image the same split")
    out = {}
    for split in sorted({r[3] for r in rows}):
        image_ids, paths, seen = [], [], set()
        cap_ids, cap_groups, captions, problems = [], [], [], {}
        for image_id, image_path, caption, s, where in rows:
            if s != split:
                continue
            if image_id not in seen:
                seen.add(image_id)
                image_ids.append(image_id)
                paths.append(image_path)
            if caption is None:
                problems[len(cap_ids)] = f"{where}: the caption of {image_id} is missing, null or empty"
            cap_ids.append(f"{image_id}#{len(cap_ids)}")
            cap_groups.append(image_id)
            captions.append(caption or "")
        images = file_images(paths, image_ids, image_ids)
        out[split] = Split(path.stem, split, PAIRS, images, TextSide(cap_ids, cap_groups, captions, problems))
    return out


def _bad_file(path: Path, where: str, what: str, hint: str | None = None) -> FeatcacheError:
    return FeatcacheError(f"{path}{where}: {what}",
                          hint or "fix the file; see docs/data.md for the formats featcache reads")


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise _bad_file(path, f" (byte {err.start})", "is not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise _bad_file(path, f":{err.lineno}:{err.colno}", f"is not valid JSON ({err.msg})") from None


def _table_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a CSV or JSONL file, each line checked as it is read."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise _bad_file(path, f":{line}", "is not valid UTF-8", "save the file as UTF-8") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted newlines stay in the caption
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise _bad_file(path, ":1", f"the header must name 'image' and 'caption' columns, got {reader.fieldnames}")
        return [(reader.line_num, rec) for rec in reader]
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is valid inside JSON
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise _bad_file(path, f":{n}", f"is not a JSON object ({err.msg})") from None
        if not isinstance(rec, dict):
            raise _bad_file(path, f":{n}", f"each line must be a JSON object, got {type(rec).__name__}")
        records.append((n, rec))
    return records


def _text_field(rec: dict, key: str) -> str | None:
    """A string field; None when it is missing, null, not a string, or blank."""
    value = rec.get(key)
    return value if isinstance(value, str) and value.strip() else None


def pair_table(path: Path, options: dict) -> dict[str, Split]:
    salt = options.get("salt", "")
    allow_outside = options.get("outside") == "allow"  # images named by ../ or an absolute path
    rows = []
    for n, rec in _table_records(path):
        image = _text_field(rec, "image")
        if image is None:
            raise _bad_file(path, f":{n}", f"needs an 'image' file name (a non-empty string), got {rec.get('image')!r}")
        image = os.path.normpath(image)  # ./a.png and a.png are one image id
        if not allow_outside and (os.path.isabs(image) or image.split(os.sep)[0] == os.pardir):
            raise _bad_file(path, f":{n}", f"the image {image!r} lies outside the data set's folder {path.parent}",
                            f"move the images under {path.parent}, or allow it: --dataset {path}:outside=allow")
        split = rec.get("split")
        if split in (None, ""):
            split = hash_split(image, salt)
        elif not isinstance(split, str) or not split.strip():
            raise _bad_file(path, f":{n}", f"'split' must be a non-empty string such as train, val or test, "
                                           f"got {split!r}")
        elif re.search(r"-sample\d+$", split):
            raise _bad_file(path, f":{n}", f"the split name {split!r} is reserved for --limit subsets",
                            "rename the split")
        caption = _text_field(rec, "caption")
        rows.append((image, path.parent / image, caption, split, f"{path}:{n}"))
    return _pairs(path, rows)


def coco_captions(path: Path, data: dict, options: dict) -> dict[str, Split]:
    root = Path(options.get("images", path.parent))
    split = options.get("split", "train" if "train" in path.name else "val")
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise _bad_file(path, "", "a COCO captions file needs 'images' and 'annotations' lists")
    files = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise _bad_file(path, f" images[{i}]", "needs an 'id' and a 'file_name'")
        if not isinstance(img["id"], (int, str)) or isinstance(img["id"], bool):
            raise _bad_file(path, f" images[{i}]", f"'id' must be a number or a string, got {img['id']!r}")
        files[img["id"]] = img["file_name"]
    rows = []
    for i, a in enumerate(annotations):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, str)) or a["image_id"] not in files:
            raise _bad_file(path, f" annotations[{i}]",
                            f"'image_id' {a.get('image_id') if isinstance(a, dict) else a!r} matches no image")
        caption = a.get("caption")
        rows.append((files[a["image_id"]], root / files[a["image_id"]],
                     caption.strip() if isinstance(caption, str) and caption.strip() else None, split,
                     f"{path} annotations[{i}]", (a["image_id"], a.get("id", i))))
    rows.sort(key=lambda r: (str(r[5][0]), str(r[5][1])))
    return _pairs(path, [r[:5] for r in rows])


def karpathy(path: Path, data: dict, options: dict) -> dict[str, Split]:
    root = Path(options.get("images", path.parent))
    if not isinstance(data.get("images"), list):
        raise _bad_file(path, "", "a Karpathy split file needs an 'images' list")
    rows = []
    for i, img in enumerate(data["images"]):
        where = f" images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
            raise _bad_file(path, where, "needs a 'filename'")
        if not isinstance(img.get("sentences"), list) or not img["sentences"]:
            raise _bad_file(path, where, f"{img['filename']} has no 'sentences'")
        if not isinstance(img.get("split"), str):
            raise _bad_file(path, where, f"{img['filename']} needs a 'split' (train, restval, val or test)")
        rel = Path(img.get("filepath", "") or "") / img["filename"]
        split = "train" if img["split"] == "restval" else img["split"]
        for j, sent in enumerate(img["sentences"]):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            rows.append((rel.as_posix(), root / rel, raw.strip() if isinstance(raw, str) and raw.strip() else None,
                         split, f"{path}{where}.sentences[{j}]"))
    return _pairs(path, rows)


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
    shown: dict[str, str] = {}
    for c in classnames:  # "red_x" and "red x" would be one class in the prompts
        other = shown.setdefault(c.replace("_", " "), c)
        if other != c:
            raise FeatcacheError(f"{path}: the class folders {other!r} and {c!r} both read as "
                                 f"{c.replace('_', ' ')!r}", "rename one of them")
    out = {}
    for split, root in roots.items():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FeatcacheError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                                 "put images in class subfolders: <root>/<class>/<image>")
        ids = [p.relative_to(root).as_posix() for p in files]
        groups = [p.relative_to(root).parts[0].replace("_", " ") for p in files]
        names = [c.replace("_", " ") for c in classnames]
        out[split] = Split(path.name, split, CLASSES, file_images(files, ids, groups),
                           prompt_side(names, templates), names, templates)
    return out
