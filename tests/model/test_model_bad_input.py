"""Bad input to the aligned model: one line naming what is wrong and what to do, never a traceback."""

import json
import shutil

import numpy as np
import pytest
from conftest import save_tiny_vit
from tiny_model import train_tiny_run
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cli.main import app
from featcache.pipeline.model import AlignedModel, export_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture()
def folder(tiny_run, tmp_path):
    return export_model(tiny_run[1], tmp_path / "model")


def _fails(*args) -> str:
    out = runner.invoke(app, [str(a) for a in args])
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and out.output.startswith("error: ")
    return out.output


def test_an_undecodable_image_is_named_and_skipped_on_request(tiny_run, tmp_path):
    _, run = tiny_run
    good = sorted(tiny_run[0]["pairs"].parent.glob("*.png"))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:40])
    model = AlignedModel.from_run(run, device="cpu", sides=("image",))
    with pytest.raises(FeatcacheError, match="broken.png"):
        model.encode_image([good[0], bad])
    with pytest.raises(FeatcacheError, match="cannot read image .*absent.png"):
        model.encode_image([tmp_path / "absent.png"])
    out = model.encode_image([good[0], bad, good[1]], skip_bad=True)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[[0, 2]], model.encode_image(good), atol=1e-6)

    assert "broken.png" in _fails("predict", "--run", run, good[0], bad, "--labels", "red,blue")
    ok = runner.invoke(app, ["predict", "--run", str(run), str(good[0]), str(bad), "--labels", "red,blue",
                             "--skip-bad", "--json"])
    assert ok.exit_code == 0, ok.output
    rows = json.loads(ok.stdout)
    assert "error" in rows[1] and rows[1]["image"] == str(bad) and len(rows[0]["labels"]) == 2
    ok = runner.invoke(app, ["embed", "--run", str(run), "--images", str(good[0]), "--images", str(bad),
                             "--skip-bad", "--out", str(tmp_path / "e.npy")])
    assert ok.exit_code == 0 and "skipped: " + str(bad) in ok.output
    assert json.loads((tmp_path / "e.ids.json").read_text()) == [str(good[0])]


def test_an_empty_label_list_is_refused(tiny_run):
    _, run = tiny_run
    image = sorted(tiny_run[0]["pairs"].parent.glob("*.png"))[0]
    assert "empty" in _fails("predict", "--run", run, image, "--labels", "")
    assert "empty" in _fails("predict", "--run", run, image, "--labels", " , ")
    model = AlignedModel.from_run(run, device="cpu")
    with pytest.raises(FeatcacheError, match="label list is empty"):
        model.classify([image], [])
    with pytest.raises(FeatcacheError, match="given twice"):
        model.classify([image], ["cat", "cat"])
    with pytest.raises(FeatcacheError, match="needs a \\{\\}"):
        model.classify([image], ["cat"], templates=["a photo"])


def test_encoder_weights_not_on_this_machine_say_which_and_where(tiny_run, folder, tmp_path):
    vit = tiny_run[0]["vit"][3:]
    config = json.loads((folder / "config.json").read_text())
    config["image"]["model"] = "hf:" + str(tmp_path / "gone" / "vit")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FeatcacheError) as err:
        AlignedModel.load(folder, device="cpu")
    assert f"image encoder hf:{tmp_path}/gone/vit, whose weights were at {tmp_path}/gone/vit" in err.value.message
    assert "--image-model" in err.value.hint and config["image"]["identity"]["weights_sha256"][:12] in err.value.hint
    assert "weights were at" in _fails("predict", "--run", folder, tiny_run[0]["pairs"].parent / "img000.png",
                                       "--labels", "red")

    copy = shutil.copytree(vit, tmp_path / "copy-of-vit")  # the same weights elsewhere: accepted, checked
    model = AlignedModel.load(folder, device="cpu", image_model=f"hf:{copy}")
    assert model.encode_image([tiny_run[0]["pairs"].parent / "img000.png"]).shape == (1, 16)

    other = save_tiny_vit(tmp_path / "other-vit", seed=1)  # other weights: refused, the field named
    with pytest.raises(FeatcacheError, match="differs from the one the heads were trained on: weights_sha256"):
        AlignedModel.load(folder, device="cpu", image_model=f"hf:{other}")


def test_a_model_folder_whose_heads_do_not_match_its_config(tiny_run, folder, tmp_path):
    shutil.copy(folder / "heads.safetensors", tmp_path / "heads.safetensors")
    (folder / "heads.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FeatcacheError, match="heads in .* do not match the model's config.json \\(sha256"):
        AlignedModel.load(folder, device="cpu")

    shutil.copy(tmp_path / "heads.safetensors", folder / "heads.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["head"]["d_out"] = 8  # the record says 8 dimensions; the file holds 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FeatcacheError, match="do not match the model's config.json \\(linear heads to 8"):
        AlignedModel.load(folder, device="cpu")
    assert "do not match" in _fails("predict", "--run", folder, tiny_run[0]["pairs"].parent / "img000.png",
                                    "--labels", "red")

    (folder / "config.json").write_text("{}")
    with pytest.raises(FeatcacheError, match="not a featcache model folder"):
        AlignedModel.load(folder, device="cpu")
    with pytest.raises(FeatcacheError, match="no model folder"):
        AlignedModel.load(tmp_path / "nowhere", device="cpu")


def test_embed_needs_exactly_one_input_and_a_known_format(tiny_run, tmp_path):
    _, run = tiny_run
    assert "exactly one of" in _fails("embed", "--run", run, "--out", tmp_path / "e.npy")
    assert ".npy or .parquet" in _fails("embed", "--run", run, "--texts", tmp_path / "t.txt", "--out",
                                        tmp_path / "e.csv")
    assert "already exists" in _fails("export-model", run, tiny_run[0]["pairs"].parent)


def test_export_model_never_writes_through_a_planted_link(tiny_run, tmp_path):
    run = str(tiny_run[1])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    (tmp_path / ".partial-model").symlink_to(victim)  # at the temporary folder
    out = runner.invoke(app, ["export-model", run, str(tmp_path / "model")])
    assert out.exit_code == 2 and "symbolic link" in out.output and "Traceback" not in out.output
    (tmp_path / "other").symlink_to(victim)  # at the target, with --overwrite
    (victim / "config.json").write_text("{}")
    out = runner.invoke(app, ["export-model", run, str(tmp_path / "other"), "--overwrite"])
    assert out.exit_code == 2 and "symbolic link" in out.output
    assert sorted(p.name for p in victim.iterdir()) == ["config.json", "keep.txt"]
    assert (victim / "keep.txt").read_text() == "keep me" and (victim / "config.json").read_text() == "{}"


def test_embed_never_writes_through_a_planted_link(tiny_run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n")
    for name in ("out.npy", "out.ids.json", "out.parquet"):
        link = tmp_path / name
        link.symlink_to(victim)
        target = tmp_path / ("out.parquet" if name.endswith("parquet") else "out.npy")
        out = runner.invoke(app, ["embed", "--run", str(tiny_run[1]), "--texts", str(texts), "--out", str(target),
                                  "--device", "cpu"])
        assert out.exit_code == 2 and "symbolic link" in out.output, out.output
        assert victim.read_text() == "keep me"
        link.unlink()
        (tmp_path / "out.npy").unlink(missing_ok=True)
