"""A tiny cache and one short run on it, for the model room's tests (each module takes it as a fixture)."""

import shutil

from conftest import build_tiny_cache, make_pairs
from typer.testing import CliRunner

from featcache.cli.main import app


def train_tiny_run(root):
    """(cache info, run folder): tiny random encoders, their cache, and `featcache align` on it."""
    cache = build_tiny_cache(root, n=48)
    out = CliRunner().invoke(app, ["align", "--image-model", cache["vit"], "--text-model", cache["bert"],
                                   "--dataset", str(cache["pairs"]), "--cache-dir", str(cache["cache"]),
                                   "--runs-dir", str(root / "runs"), "--epochs", "2", "--batch-size", "16",
                                   "--d-out", "16", "--layers", "last"])
    assert out.exit_code == 0, out.output
    run = next(p for p in (root / "runs").iterdir() if (p / "summary.json").exists())
    return cache, run


def class_folder(tmp_path):
    """<root>/<class>/<image>: an image-folder classification set of the pair set's shapes."""
    pairs = make_pairs(tmp_path / "src", n=16)
    root = tmp_path / "shapes"
    for i, png in enumerate(sorted(pairs.parent.glob("*.png"))):
        colour = ["red", "green", "blue", "yellow"][i % 4]
        (root / colour).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, root / colour / png.name)
    return root
