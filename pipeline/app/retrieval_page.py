"""``featcache eval retrieval --html``: a run's example queries as a page that opens anywhere.

It lives in the app because it needs both stages: the run's rankings come from stage two
(``evaluate.examples``), the pictures from the data set stage one extracted (``thumbnails``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import open_new
from featcache.pipeline.app.retrieval_html import render
from featcache.pipeline.app.thumbnails import thumbnails
from featcache.pipeline.evaluate.examples import retrieval_examples
from featcache.pipeline.evaluate.reads import Reads
from featcache.pipeline.evaluate.retrieval import RetrievalConfig

TOP_K = 5


@dataclass
class PageConfig:
    path: Path
    queries: int = 20  # per direction
    seed: int = 0
    force: bool = False  # replace an existing file


def check_page_path(page: PageConfig) -> Path:
    """Refuse a page path before any work is done (as ``export`` refuses its HDF5 path)."""
    out = Path(page.path)
    if out.is_dir():
        raise FeatcacheError(f"{out} is a folder", "name the page to write, e.g. gallery.html")
    if not out.parent.is_dir():
        raise FeatcacheError(f"the folder {out.parent} does not exist", "create it first, or write elsewhere")
    if (out.exists() or out.is_symlink()) and not page.force:
        raise FeatcacheError(f"{out} already exists; it was left untouched", "pass --force to replace it")
    if page.queries < 1:
        raise FeatcacheError(f"--html-queries must be at least 1, got {page.queries}")
    return out


def write_retrieval_page(cfg: RetrievalConfig, page: PageConfig, result: dict | None = None,
                         reads: Reads | None = None, run_dir: Path | None = None) -> Path:
    """The page for one run (``result``: its scores, shown in the header). Written beside the
    target under a temporary name opened without following links, then renamed over it: a
    failed write leaves no partial page, and a link at the target is replaced, never followed."""
    out = check_page_path(page)
    examples = retrieval_examples(cfg, page.queries, page.seed, TOP_K, reads, run_dir)
    p = examples.pairs
    rows = {int(p.image_rows[h.index]) for q in examples.text_to_image for h in q.hits}
    rows |= {int(p.image_rows[q.correct[0]]) for q in examples.text_to_image if q.correct}
    rows |= {int(p.image_rows[q.index]) for q in examples.image_to_text}
    text = render(examples, thumbnails(p.images, sorted(rows)), result)
    tmp = out.with_name(f".{out.name}.tmp")
    f = open_new(tmp, "wb")  # a link planted at the temporary name is refused here, and left alone
    try:
        with f:
            f.write(text.encode("utf-8"))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
