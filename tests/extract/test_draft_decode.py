"""``--decode draft`` (pipeline/extract/decoding.py): JPEGs decoded at reduced scale, never below
the input size, in a store with its own identity that is never mixed with whole-decoded ones;
other formats bitwise as the default path; an AlignedModel trained on such stores drafts too."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_gpu_decode import _cosines, _rows, jpeg_bytes, synth
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.data.decode import decode_image, draft_request, jpeg_draft
from featcache.pipeline.extract.run import ExtractConfig, extract

SIZES = [(120, 90), (200, 150), (90, 130), (60, 40), (300, 280)]  # 1/2, 1/4, 1/2 (portrait), whole, 1/8


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def make_photo_pairs(root: Path, splits: bool = False) -> Path:
    """JPEGs large enough to draft for a 28 px model (and one that is not), plus one PNG."""
    root.mkdir(parents=True, exist_ok=True)
    files = {f"photo{i}.jpg": jpeg_bytes(synth(i, w, h)) for i, (w, h) in enumerate(SIZES * (3 if splits else 1))}
    files["drawing.png"] = _png(synth(77, 160, 120))
    rows = [{"image": name, "caption": f"picture {i % 4}.", "split": ["train", "val", "test"][i % 3] if splits else "train"}
            for i, name in enumerate(files)]
    for name, data in files.items():
        (root / name).write_bytes(data)
    out = root / "pairs.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def _cfg(model, pairs, cache_dir, **kw):
    kw = {"batch_size": 4, "chunk_rows": 8, "splits": ["train"], "device": "cpu", **kw}
    return ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=cache_dir, **kw)


def test_a_draft_keeps_the_shorter_side_at_least_the_input_size():
    for (w, h), size, want in [((640, 480), 224, (320, 240)), ((200, 150), 28, (50, 38)),
                               ((120, 90), 28, (60, 45)), ((60, 40), 28, (60, 40)), ((300, 280), 28, (38, 35))]:
        data = jpeg_bytes(synth(0, w, h))
        with jpeg_draft(size):
            img = decode_image(data, "x.jpg")
        assert img.size == want and min(img.size) >= min(size, w, h), (w, h, size, img.size)
        assert decode_image(data, "x.jpg").size == (w, h)  # outside the block: whole
    assert draft_request(640, 480, 224) == (299, 224) and draft_request(100, 50, 224) == (100, 50)
    with jpeg_draft(28):  # other formats are decoded whole
        assert decode_image(_png(synth(1, 200, 150)), "x.png").size == (200, 150)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated on display: the draft scales both sides, the orientation still applies
    with jpeg_draft(28):
        img = decode_image(jpeg_bytes(synth(2, 240, 120), exif=exif.tobytes()), "r.jpg")
    assert img.size == (30, 60)
    mpo = io.BytesIO()  # a JPEG with a second picture after it (MPF), as cameras write: PIL calls it MPO
    synth(3, 200, 150).save(mpo, "MPO", save_all=True, append_images=[synth(4, 200, 150)])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    with jpeg_draft(28):
        assert decode_image(mpo.getvalue(), "camera.jpg").size == (50, 38)


def test_draft_stores_have_their_own_identity_and_keep_other_formats_bitwise(tiny_vit, tmp_path):
    pairs = make_photo_pairs(tmp_path / "data")
    cpu = extract(_cfg(tiny_vit, pairs, tmp_path / "cpu"))[0]
    draft = extract(_cfg(tiny_vit, pairs, tmp_path / "draft", decode="draft", num_workers=2))[0]
    store = FeatureStore.open(draft.path)
    assert store.is_complete() and draft.computed_rows == cpu.computed_rows == len(SIZES) + 1
    prep = dict(store.identity["encoder"]["preprocessing"])
    assert prep.pop("decode") == "pil-draft" and prep == FeatureStore.open(cpu.path).identity["encoder"]["preprocessing"]
    assert store.attrs["command"].endswith("--decode draft")
    from featcache.cache.listing import describe

    assert describe(draft.path).variant == "cls-28px pil-draft" and describe(cpu.path).variant == "cls-28px"
    ids = store.ids
    want, got = _rows(cpu.path), _rows(draft.path)
    png = ids.index("drawing.png")
    whole = ids.index("photo3.jpg")  # 60 x 40: no smaller scale keeps 28 px, so decoded whole
    drafted = [i for i, name in enumerate(ids) if name.endswith(".jpg") and i != whole]
    for layer in want:
        assert np.array_equal(want[layer][[png, whole]], got[layer][[png, whole]]), layer
        assert _cosines(want[layer][drafted], got[layer][drafted]).min() > 0.9, layer
    assert any(not np.array_equal(want[n][drafted], got[n][drafted]) for n in want)  # really drafted pixels


def test_a_whole_decoded_store_is_not_reused_by_a_draft_extraction(tiny_vit, tmp_path):
    pairs = make_photo_pairs(tmp_path / "data")
    extract(_cfg(tiny_vit, pairs, tmp_path / "cache"))
    with pytest.raises(FeatcacheError, match="preprocessing") as err:
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", decode="draft"))
    assert err.value.hint.startswith("pass --decode cpu to go on with it")  # a resume that forgot its --decode
    result = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", decode="draft", overwrite=True))[0]
    assert FeatureStore.open(result.path).identity["encoder"]["preprocessing"]["decode"] == "pil-draft"
    with pytest.raises(FeatcacheError, match="preprocessing") as err:  # and back
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache"))
    assert err.value.hint.startswith("pass --decode draft to go on with it") and "--overwrite" in err.value.hint
    with pytest.raises(FeatcacheError, match="preprocessing") as err:  # another difference too: no --decode hint
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", dtype="float32"))
    assert err.value.hint == "pass --overwrite to rebuild it, or use another --cache-dir"


def test_draft_with_an_image_processor_or_an_unknown_decode_is_one_line(tmp_path, tiny_vit):
    from test_own_encoders import save_vision_model

    processor = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}
    model = save_vision_model(tmp_path / "vit", "vit", processor)
    pairs = make_photo_pairs(tmp_path / "data")
    with pytest.raises(FeatcacheError, match="own ViTImageProcessor") as err:
        extract(_cfg(model, pairs, tmp_path / "cache", decode="draft"))
    assert "drop --decode draft" in err.value.hint
    out = CliRunner().invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--device", "cpu",
                                   "--decode", "drafty", "--cache-dir", str(tmp_path / "c2")])
    assert out.exit_code != 0 and "--decode 'drafty'" in out.output and "draft" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "c2").exists()


def test_an_aligned_model_of_draft_stores_drafts_its_jpegs(tmp_path, tiny_vit, tiny_bert):
    """Trained on draft features, it must see drafted pixels too: a whole decode would give
    features the heads never saw. Its loaded encoder carries the draft identity, so it is checked."""
    from featcache.pipeline.model import AlignedModel

    pairs = make_photo_pairs(tmp_path / "data", splits=True)
    for model, decode in ((tiny_vit, "draft"), (tiny_bert, "cpu")):
        extract(_cfg(model, pairs, tmp_path / "cache", splits=None, decode=decode))
    out = CliRunner().invoke(app, ["align", "--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}",
                                   "--dataset", str(pairs), "--cache-dir", str(tmp_path / "cache"),
                                   "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--batch-size", "4",
                                   "--d-out", "8", "--layers", "last"])
    assert out.exit_code == 0, out.output
    run = next(p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").exists())
    model = AlignedModel.from_run(run, device="cpu")
    store = next(s for s in map(FeatureStore.open, (tmp_path / "cache").rglob("*.zarr"))
                 if s.identity["dataset"]["split"] == "test" and s.identity["dataset"]["side"] == "image")
    assert store.identity["encoder"]["preprocessing"]["decode"] == "pil-draft"
    layer = json.loads((run / "config.json").read_text())["image_layer"]
    stored = store.read(layer, np.float32)
    features, bad = model.image_features([pairs.parent / i for i in store.ids])
    assert bad == []
    np.testing.assert_allclose(features.astype(np.float32), stored, rtol=2 ** -10, atol=1e-6)
    encoder = model.encoders["image"]
    assert encoder.preprocessing["decode"] == "pil-draft"
    encoder.preprocessing = {k: v for k, v in encoder.preprocessing.items() if k != "decode"}
    whole, _ = model.image_features([pairs.parent / i for i in store.ids])  # what it gave before drafts
    assert not np.allclose(whole.astype(np.float32), stored, rtol=2 ** -10, atol=1e-6)


def test_a_run_of_draft_stores_names_the_decode_of_a_whole_decoded_test_store(tmp_path, tiny_vit, tiny_bert):
    pairs = make_photo_pairs(tmp_path / "data", splits=True)
    for model, decode in ((tiny_vit, "draft"), (tiny_bert, "cpu")):
        extract(_cfg(model, pairs, tmp_path / "cache", splits=None, decode=decode))
    common = ["--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}", "--dataset", str(pairs),
              "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    out = CliRunner().invoke(app, ["align", *common, "--epochs", "1", "--batch-size", "4", "--d-out", "8",
                                   "--layers", "last"])
    assert out.exit_code == 0, out.output
    extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["test"], overwrite=True))  # whole-decoded test split
    evaluate = ["eval", "retrieval", "--runs-dir", str(tmp_path / "runs"), "--dataset", str(pairs)]
    out = CliRunner().invoke(app, evaluate)  # another cache than the run's: told which one holds it
    assert out.exit_code == 2 and f"pass --cache-dir {tmp_path / 'cache'}" in " ".join(out.output.split()), out.output
    out = CliRunner().invoke(app, [*evaluate, "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    flat = " ".join(out.output.split())
    assert "another preprocessing decode than the run's training features (pil-draft vs (none))" in flat, flat
    assert "--decode draft --overwrite" in flat


def test_extract_for_a_draft_run_drafts_too(tmp_path, tiny_vit, tiny_bert):
    """search, eval classify and eval suite --extract make a draft run's missing stores with its
    decode: a whole-decoded one was extracted, then refused by the same command as another
    preprocessing."""
    from featcache.cache.commands import decode_of

    assert [decode_of(i) for i in (None, {}, {"preprocessing": {"decode": "pil-draft"}},
                                   {"preprocessing": {"decode": "nvjpeg"}})] == ["cpu", "cpu", "draft", "gpu"]
    pairs = make_photo_pairs(tmp_path / "data", splits=True)
    for model, decode in ((tiny_vit, "draft"), (tiny_bert, "cpu")):
        extract(_cfg(model, pairs, tmp_path / "cache", splits=None, decode=decode))
    runs = ["--runs-dir", str(tmp_path / "runs")]
    out = CliRunner().invoke(app, ["align", "--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}",
                                   "--dataset", str(pairs), "--cache-dir", str(tmp_path / "cache"), *runs,
                                   "--epochs", "1", "--batch-size", "4", "--d-out", "8", "--layers", "last"])
    assert out.exit_code == 0, out.output
    fresh = tmp_path / "fresh"
    out = CliRunner().invoke(app, ["search", "--run", "latest", *runs, "--dataset", str(pairs), "--cache-dir",
                                   str(fresh), "--extract", "--device", "cpu", "picture", "-k", "2"])
    assert out.exit_code == 0, out.output
    folder = tmp_path / "shapes"
    for cls, (w, h) in (("wide", (200, 120)), ("tall", (120, 200))):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            (folder / cls / f"{i}.jpg").write_bytes(jpeg_bytes(synth(i, w + i, h)))
    out = CliRunner().invoke(app, ["eval", "classify", "--dataset", str(folder), "--cache-dir", str(fresh), *runs,
                                   "--extract", "--no-baseline"])  # the baseline reads the training split
    assert out.exit_code == 0, out.output
    suite = tmp_path / "mine.toml"
    suite.write_text('name = "mine"\n[[benchmark]]\nname = "shapes"\ntask = "classify"\nsource = "shapes"\n')
    out = CliRunner().invoke(app, ["eval", "suite", "--suite", str(suite), "--benchmark-root", str(tmp_path),
                                   "--cache-dir", str(tmp_path / "suite-cache"), *runs, "--extract",
                                   "--out", str(tmp_path / "o")])
    assert out.exit_code == 0 and "skipped" not in out.output, out.output
    images = [FeatureStore.open(p) for p in [*fresh.rglob("*.zarr"), *(tmp_path / "suite-cache").rglob("*.zarr")]]
    images = [s for s in images if s.identity["dataset"]["side"] == "image"]
    assert len(images) == 3 and all(s.identity["encoder"]["preprocessing"]["decode"] == "pil-draft" for s in images)


def test_a_draft_runs_missing_stores_are_named_with_their_decode(tmp_path, tiny_vit, tiny_bert):
    """A missing store's hint is the extract command that makes it: for a draft run it asks for
    --decode draft (the plain command made a store the run refuses). The untrained baseline's
    training split missing from --cache-dir points at the run's own cache, or --no-baseline."""
    import shutil

    pairs = make_photo_pairs(tmp_path / "data", splits=True)
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    for model, decode in ((tiny_vit, "draft"), (tiny_bert, "cpu")):
        extract(_cfg(model, pairs, cache, splits=None, decode=decode))
        extract(_cfg(model, pairs, fresh, splits=["test"], decode=decode))
    runs = ["--runs-dir", str(tmp_path / "runs")]
    out = CliRunner().invoke(app, ["align", "--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}",
                                   "--dataset", str(pairs), "--cache-dir", str(cache), *runs,
                                   "--epochs", "1", "--batch-size", "4", "--d-out", "8", "--layers", "last"])
    assert out.exit_code == 0, out.output
    evaluate = ["eval", "retrieval", *runs, "--dataset", str(pairs)]
    out = CliRunner().invoke(app, [*evaluate, "--cache-dir", str(fresh)])
    flat = " ".join(out.output.split())
    assert out.exit_code == 2 and "Traceback" not in flat, flat
    assert f"pass --cache-dir {cache}" in flat and "--no-baseline" in flat, flat
    assert CliRunner().invoke(app, [*evaluate, "--cache-dir", str(fresh), "--no-baseline"]).exit_code == 0
    test_images = next(p for p in cache.rglob("*.zarr") if "vit" in str(p) and "/test/" in str(p))
    shutil.rmtree(test_images)
    out = CliRunner().invoke(app, [*evaluate, "--cache-dir", str(cache)])
    flat = " ".join(out.output.split())
    assert out.exit_code == 2 and "--split test" in flat and flat.rstrip(")").endswith("--decode draft"), flat
