"""The retrieval gallery as one HTML document: inline CSS, inline images, no script.

Captions and ids are user data (a caption may hold ``<script>``), so every string goes through
``html.escape`` on its way in; nothing is fetched when the page opens, so it shows the same in a
mail attachment, an air-gapped machine or a browser with scripts off.
"""

from __future__ import annotations

import html

from featcache.pipeline.app.thumbnails import Thumb
from featcache.pipeline.evaluate.examples import Examples, Hit, Query

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.5em 0 .5em; }
.meta, .note { color: #666; font-size: .9em; }
table.metrics { border-collapse: collapse; margin: .5em 0; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.query { border-top: 1px solid #ddd; padding: .6em 0; display: flex; gap: 1em; align-items: flex-start; }
.ask { width: 220px; flex: none; }
.ask .caption { font-weight: 600; }
.hits { display: flex; gap: .5em; flex-wrap: wrap; margin: 0; padding: 0; list-style: none; }
.hit { width: 132px; font-size: .8em; border: 3px solid transparent; padding: 2px; }
.hits.captions { flex-direction: column; gap: .2em; }
.hits.captions .hit { width: auto; font-size: .95em; }
.hit.correct { border-color: #1a9641; background: #eef8ee; }
.mark { color: #1a9641; font-weight: 700; }
.thumb { width: 128px; height: 128px; object-fit: contain; display: block; background: #fff; }
.missing { width: 128px; height: 128px; background: #eee; color: #777; font-size: .75em;
           display: flex; align-items: center; justify-content: center; text-align: center; overflow: hidden; }
.score { color: #666; }
"""


def e(value) -> str:
    return html.escape(str(value), quote=True)


def picture(t: Thumb) -> str:
    if t.uri is None:
        return f'<div class="missing" title="{e(t.source or t.id)}">{e(t.id)}: {e(t.problem)}</div>'
    return f'<img class="thumb" src="{e(t.uri)}" alt="{e(t.id)}" title="{e(t.source or t.id)}">'


def mark(correct: bool) -> str:
    return '<span class="mark">&#10003; correct</span> ' if correct else ""


def missed(q: Query, k: int, what: str) -> str:
    if q.first_correct < k:
        return ""
    if not q.correct:
        return f'<p class="note">no correct {what} in the gallery</p>'
    shown = " (below)" if what == "image" else ""
    return f'<p class="note">the first correct {what}{shown} is at rank {q.first_correct + 1}</p>'


def hit(h: Hit, rank: int, rid: str, body: str) -> str:
    return (f'<li class="hit{" correct" if h.correct else ""}" data-id="{e(rid)}">{mark(h.correct)}'
            f'<span class="score">#{rank + 1} &middot; {h.score:.3f}</span> {body}</li>')


def caption_query(q: Query, ex: Examples, captions: list[str], thumbs: dict[int, Thumb]) -> str:
    p = ex.pairs
    row = int(p.caption_rows[q.index])
    hits = "".join(hit(h, n, p.images.ids[int(p.image_rows[h.index])], picture(thumbs[int(p.image_rows[h.index])]))
                   for n, h in enumerate(q.hits))
    expected = ""
    if q.first_correct >= ex.k and q.correct:
        want = int(p.image_rows[q.correct[0]])
        expected = f'<div class="expected" data-id="{e(p.images.ids[want])}">{picture(thumbs[want])}</div>'
    return (f'<div class="query" data-direction="text-to-image" data-id="{e(p.texts.ids[row])}"><div class="ask">'
            f'<div class="caption">{e(captions[row])}</div><div class="meta">caption {e(p.texts.ids[row])}</div>'
            f'{missed(q, ex.k, "image")}{expected}</div><ol class="hits images">{hits}</ol></div>')


def image_query(q: Query, ex: Examples, captions: list[str], thumbs: dict[int, Thumb]) -> str:
    p = ex.pairs
    row = int(p.image_rows[q.index])
    hits = "".join(hit(h, n, p.texts.ids[int(p.caption_rows[h.index])], e(captions[int(p.caption_rows[h.index])]))
                   for n, h in enumerate(q.hits))
    expected = ""
    if q.first_correct >= ex.k and q.correct:
        expected = f'<p class="note">for example: {e(captions[int(p.caption_rows[q.correct[0]])])}</p>'
    return (f'<div class="query" data-direction="image-to-text" data-id="{e(p.images.ids[row])}"><div class="ask">'
            f'{picture(thumbs[row])}{missed(q, ex.k, "caption")}{expected}</div>'
            f'<ol class="hits captions">{hits}</ol></div>')


def metrics_table(result: dict | None) -> str:
    if not result:
        return ""
    rows = [("run", result["metrics"])]
    if "baseline" in result:
        rows.append((f'{result["baseline"]["method"]} (no training)', result["baseline"]["metrics"]))
    ks = [f"R@{k}" for k in result["ks"]]
    head = "".join(f"<th>{d} {e(k)}</th>" for d in ("i&rarr;t", "t&rarr;i") for k in ks)
    body = "".join(f"<tr><th>{e(name)}</th>" + "".join(
        f"<td>{100 * m[d][k]:.1f}</td>" for d in ("image_to_text", "text_to_image") for k in ks) + "</tr>"
        for name, m in rows)
    return f'<table class="metrics"><tr><th></th>{head}</tr>{body}</table>'


def render(ex: Examples, thumbs: dict[int, Thumb], result: dict | None = None) -> str:
    """The page: a header with the run and its scores, then both directions' queries."""
    p = ex.pairs
    captions = p.texts.texts or [""] * p.texts.rows
    title = f"Retrieval gallery: run {p.run_dir.name} on {p.dataset}"
    layers = f'{p.run_cfg["image_layer"]} x {p.run_cfg["text_layer"]}'
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">split {e(p.images.identity.get("dataset", {}).get("split", ""))}, layers {e(layers)}, '
        f"{len(p.image_rows)} images and {len(p.caption_rows)} captions; {len(ex.text_to_image)} caption and "
        f"{len(ex.image_to_text)} image queries drawn with seed {ex.seed}; correct items are framed in green "
        f"and marked &#10003;; scores are cosines.</p>",
        metrics_table(result),
        f'<section id="text-to-image"><h2>Caption &rarr; top {ex.k} images</h2>',
        *[caption_query(q, ex, captions, thumbs) for q in ex.text_to_image],
        f'</section><section id="image-to-text"><h2>Image &rarr; top {ex.k} captions</h2>',
        *[image_query(q, ex, captions, thumbs) for q in ex.image_to_text],
        "</section></body></html>", ""])
