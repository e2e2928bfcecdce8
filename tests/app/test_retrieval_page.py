"""``eval retrieval --html``: the page's structure read back with html.parser on a tiny cache (no
browser here; benchmarks/gallery_check.py opens it in Chromium), its escaping of captions, its
marks against the groups, and its path refused the way ``export`` refuses one."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs, save_tiny_bert, save_tiny_vit
from typer.testing import CliRunner

from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.app import thumbnails as thumbs_module
from featcache.pipeline.app.thumbnails import thumbnails
from featcache.pipeline.train.runs import list_runs

runner = CliRunner()
EVIL = '<script>alert("x")</script> & a red circle'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny pair set with one hostile test caption, extracted by the tiny encoders, and one run."""
    from featcache.pipeline.extract.run import ExtractConfig, extract

    root = tmp_path_factory.mktemp("page")
    pairs = make_pairs(root / "data", n=48)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    first_test = next(r for r in rows if r["split"] == "test")
    first_test["caption"] = EVIL
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    vit, bert = save_tiny_vit(root / "vit"), save_tiny_bert(root / "bert")
    for model in (vit, bert):
        extract(ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=root / "cache", batch_size=16))
    runs = root / "runs"
    out = runner.invoke(app, ["align", "--image-model", f"hf:{vit}", "--text-model", f"hf:{bert}", "--dataset",
                              str(pairs), "--cache-dir", str(root / "cache"), "--runs-dir", str(runs), "--layers",
                              "last", "--epochs", "2", "--batch-size", "16", "--d-out", "16"])
    assert out.exit_code == 0, out.output
    return {"root": root, "cache": root / "cache", "runs": runs}


def page_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["eval", "retrieval", "--cache-dir", str(tiny["cache"]), "--runs-dir", str(tiny["runs"]),
            "--html", str(out), *extra]


class Page(HTMLParser):
    """Query blocks with their hits (id, correct), every picture, every caption text, any link out."""

    def __init__(self):
        super().__init__()
        self.queries: list[dict] = []
        self.images: list[dict] = []
        self.captions: list[str] = []
        self.external: list[str] = []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "query" in classes:
            self.queries.append({"direction": a["data-direction"], "id": a["data-id"], "hits": []})
        if "hit" in classes:
            self.queries[-1]["hits"].append((a["data-id"], "correct" in classes))
        if tag == "img":
            self.images.append(a)
        self._in_caption = "caption" in classes and tag == "div"
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)

    def handle_data(self, data):
        if self._in_caption:
            self.captions.append(data)
            self._in_caption = False


def split_stores(tiny) -> tuple[FeatureStore, FeatureStore]:
    """The test split's image and text stores (one encoder each)."""
    stores = [FeatureStore.open(p) for p in sorted(tiny["cache"].glob("*/test/*/*.zarr"))]
    return next(s for s in stores if s.texts is None), next(s for s in stores if s.texts is not None)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_the_page_shows_both_directions_with_correct_marks_and_inline_pictures(tiny, tmp_path):
    from PIL import Image

    out = tmp_path / "gallery.html"
    result = runner.invoke(app, page_args(tiny, out, "--html-queries", "3"))
    assert result.exit_code == 0, result.output
    assert f"gallery: {out}" in result.output
    page = read_page(out)
    images, texts = split_stores(tiny)
    group = dict(zip(texts.ids, texts.groups))
    own = {}
    for c, g in group.items():
        own.setdefault(g, set()).add(c)
    by_direction = {d: [q for q in page.queries if q["direction"] == d] for d in ("text-to-image", "image-to-text")}
    assert [len(v) for v in by_direction.values()] == [3, 3]
    for q in by_direction["text-to-image"]:
        assert len(q["hits"]) == min(5, images.rows)
        assert all(correct == (hit == group[q["id"]]) for hit, correct in q["hits"])  # the caption's own image
    for q in by_direction["image-to-text"]:
        assert len(q["hits"]) == 5
        assert all(correct == (hit in own[q["id"]]) for hit, correct in q["hits"])
    assert page.external == []  # nothing fetched: the page opens anywhere
    assert page.images and all(i["src"].startswith("data:image/jpeg;base64,") for i in page.images)
    for i in page.images:
        picture = Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1])))
        assert max(picture.size) <= 128 and picture.size[0] > 0
    assert set(page.captions) <= set(texts.texts)


def test_captions_are_escaped_and_the_sample_is_seeded(tiny, tmp_path):
    out = tmp_path / "all.html"
    assert runner.invoke(app, page_args(tiny, out, "--html-queries", "100")).exit_code == 0
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in text
    assert EVIL in read_page(out).captions  # every caption is a query: the hostile one reads as written
    first = tmp_path / "a.html"
    assert runner.invoke(app, page_args(tiny, first, "--html-queries", "2", "--html-seed", "7")).exit_code == 0
    written = first.read_bytes()
    again = runner.invoke(app, page_args(tiny, first, "--html-queries", "2", "--html-seed", "7", "--force"))
    assert again.exit_code == 0, again.output
    assert first.read_bytes() == written
    ids = [q["id"] for q in read_page(first).queries]
    other = tmp_path / "b.html"
    assert runner.invoke(app, page_args(tiny, other, "--html-queries", "2", "--html-seed", "8")).exit_code == 0
    assert [q["id"] for q in read_page(other).queries] != ids


def test_bad_page_paths_are_one_line_errors_and_leave_files_alone(tiny, tmp_path):
    missing = runner.invoke(app, page_args(tiny, tmp_path / "nowhere" / "g.html"))
    assert missing.exit_code != 0 and "does not exist" in missing.output and "Traceback" not in missing.output
    folder = runner.invoke(app, page_args(tiny, tmp_path))
    assert folder.exit_code != 0 and "is a folder" in folder.output
    kept = tmp_path / "kept.html"
    kept.write_text("mine")
    existing = runner.invoke(app, page_args(tiny, kept))
    assert existing.exit_code != 0 and "--force" in existing.output and kept.read_text() == "mine"
    zero = runner.invoke(app, page_args(tiny, tmp_path / "z.html", "--html-queries", "0"))
    assert zero.exit_code != 0 and "at least 1" in zero.output and not (tmp_path / "z.html").exists()


def test_links_are_replaced_or_refused_never_followed(tiny, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "g.html"
    link.symlink_to(target)
    assert runner.invoke(app, page_args(tiny, link)).exit_code != 0  # a link there is an existing file
    forced = runner.invoke(app, page_args(tiny, link, "--force"))
    assert forced.exit_code == 0, forced.output
    assert not link.is_symlink() and "<!DOCTYPE html>" in link.read_text() and target.read_text() == "keep me"
    planted = tmp_path / ".h.html.tmp"
    planted.symlink_to(target)
    refused = runner.invoke(app, page_args(tiny, tmp_path / "h.html"))
    assert refused.exit_code != 0 and "symbolic link" in refused.output
    assert target.read_text() == "keep me" and not (tmp_path / "h.html").exists() and planted.is_symlink()


def test_html_takes_one_run(tiny, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny["runs"], runs)
    cfg = json.loads((list_runs(runs)[0] / "config.json").read_text())
    second = runner.invoke(app, ["align", "--image-model", cfg["image_model"], "--text-model", cfg["text_model"],
                                 "--dataset", cfg["dataset"], "--cache-dir", str(tiny["cache"]), "--runs-dir",
                                 str(runs), "--layers", "last", "--epochs", "1", "--batch-size", "16", "--d-out", "16",
                                 "--seed", "1"])
    assert second.exit_code == 0, second.output
    out = runner.invoke(app, page_args({**tiny, "runs": runs}, tmp_path / "g.html", "--run", "all"))
    assert out.exit_code != 0 and "--html shows one run" in out.output and not (tmp_path / "g.html").exists()


def test_an_image_changed_since_extraction_is_not_shown(tiny, monkeypatch):
    """The picture must be the one the features came from: other bytes get a note, not an image."""
    store = split_stores(tiny)[0]
    real = thumbs_module.image_side

    def edited(s):
        side = real(s)
        raw = side.raw
        side.raw = lambda row: raw(row) + b"\0" if row == 0 else raw(row)
        return side

    monkeypatch.setattr(thumbs_module, "image_side", edited)
    shown = thumbnails(store, [0, 1])
    assert shown[0].uri is None and "changed after its features were stored" in shown[0].problem
    assert shown[1].uri is not None and shown[1].problem is None
    assert np.asarray(store.sources()[1][0]).any()  # the check had a recorded hash to compare with


def test_the_page_ranks_agree_with_the_metrics(tiny):
    """The page's ranking is the one Recall@K counted: each sampled query's first correct rank
    equals the evaluation's (where the evaluation saw it, in its top max(ks)) up to exact ties,
    which the tiny set has (identical captions) and which the page orders by gallery position."""
    from featcache.pipeline.evaluate.examples import retrieval_examples
    from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval

    cfg = RetrievalConfig(cache_dir=tiny["cache"], runs_dir=tiny["runs"], baseline=False)
    ranks = eval_retrieval(cfg)["first_correct_rank"]
    ex = retrieval_examples(cfg, queries=100, seed=3)
    assert len(ex.text_to_image) == len(ranks["text_to_image"]) and len(ex.image_to_text) == len(ranks["image_to_text"])
    for direction in ("text_to_image", "image_to_text"):
        for q in getattr(ex, direction):
            query, gallery = (ex.pairs.et, ex.pairs.ei) if direction == "text_to_image" else (ex.pairs.ei, ex.pairs.et)
            scores = gallery @ query[q.index]
            best = scores[q.correct].max()
            tied = (int((scores > best + 1e-6).sum()), int((scores >= best - 1e-6).sum()) - 1)
            assert tied[0] <= q.first_correct <= tied[1]
            assert min(tied[0], 10) <= ranks[direction][q.index] <= min(tied[1], 10)
            assert [h.score for h in q.hits] == sorted((h.score for h in q.hits), reverse=True)
