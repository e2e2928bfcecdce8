"""Every bad input a user brings gets one line and a non-zero exit; nothing wrong passes in silence."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from conftest import build_tiny_cache
from PIL import Image
from typer.testing import CliRunner

from featcache.cli.main import app
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.data.decode import decode_image

runner = CliRunner()


def invoke(*argv):
    out = runner.invoke(app, [str(a) for a in argv])
    assert "Traceback" not in out.output and (out.exit_code == 0 or isinstance(out.exception, SystemExit)), \
        repr(out.exception)
    return out


def failed(out, *needles):
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    for needle in needles:
        assert needle in text, text
    return text


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (30, 30), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def jsonl(folder, rows, name="pairs.jsonl", raw=None):
    path = folder / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def extract(model, dataset, cache, *extra):
    return invoke("extract", "--model", f"hf:{model}", "--dataset", dataset, "--cache-dir", cache,
                  "--batch-size", 4, *extra)


ROW = lambda i, split="train", caption=None: {"image": f"{i}.png", "caption": caption or f"a red circle {i}.",
                                             "split": split}


@pytest.mark.parametrize("case, needles", [
    ("malformed", [":2:", "is not a JSON object"]),
    ("not-utf8", [":2", "is not valid UTF-8"]),
    ("int-split", [":2:", "'split' must be a non-empty string"]),
    ("no-image-key", [":1:", "needs an 'image'"]),
    ("array-line", [":1:", "must be a JSON object"]),
    ("leak", ["0.png is in two splits", "'train'", "'test'"]),
    ("empty", ["holds no rows"]),
])
def test_bad_jsonl_is_one_line_naming_the_line(tiny_bert, images, tmp_path, case, needles):
    rows = [ROW(0), ROW(1)]
    raw = None
    if case == "malformed":
        rows = [ROW(0), "{not json", ROW(1)]
    elif case == "not-utf8":
        raw = (json.dumps(ROW(0)) + "\n").encode() + b'{"image": "1.png", "caption": "caf\xe9"}\n'
    elif case == "int-split":
        rows = [ROW(0), {**ROW(1), "split": 3}]
    elif case == "no-image-key":
        rows = [{"caption": "x"}]
    elif case == "array-line":
        rows = ["[1, 2]"]
    elif case == "leak":
        rows = [ROW(0), ROW(0, "test", "another caption")]
    elif case == "empty":
        rows, raw = [], b"\n\n"
    path = jsonl(images, rows, raw=raw)
    failed(extract(tiny_bert, path, tmp_path / "cache"), str(path), *needles)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.zarr"))


@pytest.mark.parametrize("caption", [None, "", "   ", 7])
def test_missing_null_or_blank_caption_stops_or_is_recorded_missing(tiny_bert, images, tmp_path, caption):
    rows = [ROW(i) for i in range(4)]
    rows[2]["caption"] = caption
    if caption is None:
        del rows[2]["caption"]
    path = jsonl(images, rows)
    failed(extract(tiny_bert, path, tmp_path / "cache"), f"{path}:3", "caption of 2.png is missing, null or empty",
           "--skip-bad")
    out = extract(tiny_bert, path, tmp_path / "cache", "--skip-bad")
    assert out.exit_code == 0, out.output
    from featcache.cache.store import FeatureStore, find_stores

    store = FeatureStore.open(next(find_stores(tmp_path / "cache")))
    assert store.missing.tolist() == [False, False, True, False]
    assert "None" not in store.texts and np.isnan(store.read("block.01")[2]).all()


def test_short_csv_row_is_not_stored_as_none(tiny_bert, images, tmp_path):
    path = images / "pairs.csv"
    path.write_text("image,caption,split\n0.png,a red circle.,train\n1.png\n")
    failed(extract(tiny_bert, path, tmp_path / "cache"), f"{path}:3", "caption of 1.png is missing")


@pytest.mark.parametrize("case, needles", [
    ("coco-id", ["annotations[1]", "'image_id' 99 matches no image"]),
    ("karpathy-sentences", ["images[0]", "has no 'sentences'"]),
    ("not-json", ["is not valid JSON"]),
    ("neither", ["neither a COCO captions file"]),
])
def test_bad_coco_and_karpathy_files(tiny_bert, images, tmp_path, case, needles):
    path = images / "captions_train.json"
    if case == "coco-id":
        data = {"images": [{"id": 1, "file_name": "0.png"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 99, "caption": "y"}]}
        path.write_text(json.dumps(data))
    elif case == "karpathy-sentences":
        path.write_text(json.dumps({"images": [{"filename": "0.png", "split": "train"}]}))
    elif case == "not-json":
        path.write_text("{'images': [")
    else:
        path.write_text(json.dumps({"info": 1}))
    failed(extract(tiny_bert, path, tmp_path / "cache"), str(path), *needles)


def test_empty_image_folder_and_bad_templates(tiny_vit, tmp_path):
    folder = tmp_path / "classes"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    failed(extract(tiny_vit, folder, tmp_path / "cache"), "holds no images")
    Image.new("RGB", (30, 30)).save(folder / "cat" / "a.png")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {place}.\n")
    failed(extract(tiny_vit, f"{folder}:templates={templates}", tmp_path / "cache"), "{place}",
           "not a format string")


def test_decoding_as_a_viewer_shows_it():
    wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 16-bit, 0..65520
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    rgb = np.asarray(decode_image(buf.getvalue(), "wide.png"))
    assert rgb.max() == 255 and 100 < rgb.mean() < 155  # scaled, not clipped to white
    tall = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    tall.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), "turned.jpg").size == (20, 40)
    with pytest.raises(Exception) as err:
        decode_image(b"not an image", "/data/broken.png")
    assert "/data/broken.png" in str(err.value) and "BytesIO" not in str(err.value)


def test_decompression_bomb_message_is_whole(tiny_vit, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (400, 400)).save(folder / "0.png")
    Image.new("RGB", (30, 30)).save(folder / "1.png")
    path = jsonl(folder, [ROW(0, "test"), ROW(1, "test")])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 400 x 400 is then a "bomb"
    text = failed(extract(tiny_vit, path, tmp_path / "cache"), "0.png", "DecompressionBombError")
    assert "could be decompression bomb DOS attack" in text


@pytest.mark.parametrize("size", ["0", "-2"])
def test_image_size_is_checked(tiny_vit, images, tmp_path, size):
    path = jsonl(images, [ROW(0), ROW(1)])
    failed(extract(tiny_vit, path, tmp_path / "cache", "--image-size", size), "--image-size must be")


def test_paths_that_are_files_or_read_only(tiny_bert, images, tmp_path):
    path = jsonl(images, [ROW(0), ROW(1)])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    failed(extract(tiny_bert, path, not_a_dir), str(not_a_dir))
    cache = tmp_path / "cache"
    assert extract(tiny_bert, path, cache).exit_code == 0
    if os.geteuid() == 0:
        return  # root writes anywhere: the read-only half needs an ordinary user
    os.chmod(cache, 0o555)
    try:
        assert invoke("ls", "--cache-dir", cache).exit_code == 0
    finally:
        os.chmod(cache, 0o755)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("bad-input"), n=36)


def common(tiny, runs):
    return ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", tiny["pairs"],
            "--cache-dir", tiny["cache"], "--runs-dir", runs]


def test_cuda_without_a_gpu(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    failed(invoke("align", *common(tiny, tmp_path / "runs"), "--device", "cuda", "--epochs", 1),
           "CUDA is not available", "--device cpu")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_one_train_pair_against_one_val_pair(tiny_vit, tiny_bert, images, tmp_path):
    path = jsonl(images, [ROW(0, "train"), ROW(1, "val")])
    for model in (tiny_vit, tiny_bert):
        assert extract(model, path, tmp_path / "cache").exit_code == 0
    out = invoke("align", "--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}", "--dataset", path,
                 "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--epochs", 1)
    failed(out, "1 training and 1 validation pairs", "at least 2")


def test_broken_run_directories_are_skipped_with_a_warning(tiny, tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        out = invoke("align", *common(tiny, runs), "--epochs", 2, "--seed", seed, "--batch-size", 8)
        assert out.exit_code == 0, out.output
    good, bad = sorted(runs.iterdir())
    (bad / "summary.json").write_text("{garbage")
    out = invoke("runs", "--runs-dir", runs)
    assert out.exit_code == 0 and "warning: skipping the run" in out.output
    from featcache.pipeline.train.runs import BrokenRunWarning, list_runs

    with pytest.warns(BrokenRunWarning, match="summary.json cannot be read"):
        assert list_runs(runs) == [good]
    out = invoke("eval", "retrieval", "--cache-dir", tiny["cache"], "--runs-dir", runs)
    assert out.exit_code == 0 and "warning" in out.output, out.output
    (good / "eval" / "junk.json").write_text("not json")
    out = invoke("report", "--runs-dir", runs, "--group-by", "loss")
    assert out.exit_code == 0 and "warning: skipping" in out.output, out.output
    (runs / ".partial-20260101-000000-deadbeef").mkdir()
    out = invoke("runs", "--runs-dir", runs, "--clean")
    assert out.exit_code == 0 and "removed 1" in out.output and not list(runs.glob(".partial-*"))
    shutil.rmtree(bad)


def test_export_refuses_dirs_missing_parents_the_store_and_existing_files(tiny, tmp_path):
    from featcache.cache.store import find_stores

    store = next(find_stores(tiny["cache"]))
    failed(invoke("export", store, tmp_path), "is a folder")
    failed(invoke("export", store, tmp_path / "no" / "x.h5"), "does not exist")
    failed(invoke("export", store, store / "x.h5"), "inside the store")
    target = tmp_path / "x.h5"
    target.write_text("keep me")
    failed(invoke("export", store, target), "already exists", "--force")
    assert target.read_text() == "keep me"
    assert invoke("export", store, target, "--force").exit_code == 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_interrupted_align_does_not_talk_about_chunks(tiny, tmp_path, monkeypatch):
    import featcache.pipeline.train.loop as train

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", interrupt)
    out = runner.invoke(app, [str(a) for a in ["align", *common(tiny, tmp_path / "runs"), "--epochs", 1]])
    assert out.exit_code == 130 and "chunk" not in out.output and "nothing half-written" in out.output
    assert not list((tmp_path / "runs").glob("*")) or not [p for p in (tmp_path / "runs").iterdir()
                                                          if not p.name.startswith(".")]


def test_csv_quoted_newline_and_jsonl_line_separator_are_kept(images):
    csv_path = images / "pairs.csv"
    csv_path.write_text('image,caption,split\n0.png,"line one\nline two",train\n1.png,b,test\n')
    assert load_dataset(str(csv_path))["train"].texts.texts == ["line one\nline two"]
    path = jsonl(images, [], raw=(json.dumps(ROW(0, "train", "a\u2028b"), ensure_ascii=False) + "\n").encode())
    assert load_dataset(str(path))["train"].texts.texts == ["a\u2028b"]


def test_every_stage_two_command_reads_a_read_only_cache(tiny, tmp_path, monkeypatch):
    import subprocess

    ro = tmp_path / "ro-cache"
    ro.mkdir()
    bound = subprocess.run(["mount", "--bind", str(tiny["cache"]), str(ro)], capture_output=True, text=True)
    if bound.returncode != 0:  # needs root (CI and the dev machines run as root)
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
        monkeypatch.chdir(tmp_path)
        runs = tmp_path / "runs"
        models = ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", tiny["pairs"]]
        assert invoke("layers", *models, "--cache-dir", ro).exit_code == 0
        assert invoke("align", *models, "--cache-dir", ro, "--runs-dir", runs, "--epochs", 2).exit_code == 0
        assert invoke("sweep", *models, "--cache-dir", ro, "--runs-dir", runs, "--epochs", 2, "--seeds", 0,
                      "--loss", "clip").exit_code == 0
        assert invoke("eval", "retrieval", "--cache-dir", ro, "--runs-dir", runs).exit_code == 0
        assert invoke("report", "--runs-dir", runs).exit_code == 0
        assert invoke("ls", "--cache-dir", ro).exit_code == 0
        assert invoke("verify", "--cache-dir", ro).exit_code == 0
        out = invoke("extract", "--model", tiny["bert"], "--dataset", tiny["pairs"], "--cache-dir", ro)
        assert out.exit_code in (0, 2)  # nothing to compute; a lock file it cannot write is one line
        assert invoke("verify", "--repair", "--cache-dir", ro).exit_code == 0  # nothing to repair
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_a_20000_by_1_image_is_resized_without_a_full_size_intermediate(tiny_vit):
    """A shorter-side resize of a 20000 x 1 strip to 224 would make a 4,480,000 x 224 image (3 GB);
    only the kept square is resampled."""
    import resource

    import numpy as np
    from PIL import Image

    from featcache.pipeline.extract.loading import load_encoder

    enc = load_encoder(f"hf:{tiny_vit}", "cpu", image_size=224)
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 20000, 3), dtype=np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = enc.prepare_images([strip])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert x.shape == (1, 3, 224, 224) and np.isfinite(x.numpy()).all()
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB"


def test_an_svg_whose_entities_would_expand_to_gigabytes_is_one_line():
    import time

    from featcache.pipeline.data.decode import BadImage, decode_image

    entity = "x" * 100_000
    svg = (f'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY big "{entity}">]>'
           '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>'
           + "&big;" * 60_000 + "</text></svg>").encode()  # 400 KB that would inline to 6 GB
    start = time.monotonic()
    with pytest.raises(BadImage, match="would expand"):
        decode_image(svg, "bomb.svg")
    assert time.monotonic() - start < 10


def test_report_files_are_never_written_through_a_planted_link(tiny, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, [str(a) for a in ["align", *common(tiny, runs), "--epochs", 1]]).exit_code == 0
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    victim = tmp_path / "victim.md"
    victim.write_text("keep me")
    (out_dir / "report.md").symlink_to(victim)
    out = runner.invoke(app, ["report", "--runs-dir", str(runs), "--out", str(out_dir)])
    assert out.exit_code == 2 and "symbolic link" in out.output and victim.read_text() == "keep me"
