"""Open a retrieval gallery (``featcache eval retrieval --html``) in headless Chromium and check
what a reader would see: the page loads with no console message, every picture decodes, and the
expected number of query blocks is in the DOM the browser built (not the file as written).

    python benchmarks/gallery_check.py PAGE.html --expect 20 [--screenshot shot.png]
    python benchmarks/gallery_check.py --self-test   # the check must fail on a broken page

Chromium is the Debian package (``apt-get install chromium``, ~130 packages): too big for
``.ci/setup.sh``, so this is a script run by hand, and tests/app/test_retrieval_page.py checks
the page's structure without a browser. The page has no script of its own, so any console line
is an error; a copy of it with a probe script appended (written beside it in a temporary folder)
reports images that did not decode, which Chromium does not log by itself.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# Chromium logs console.* at INFO, whatever the level: [..:INFO:CONSOLE:1] "message", source: URL (line)
CONSOLE = re.compile(r':CONSOLE(?::\d+|\(\d+\))\] "(.*)", source: ')
PROBE_TAG = "gallery-probe"
PROBE = f"""<script>
window.addEventListener("load", () => {{
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const shown = [...document.querySelectorAll(".query")].filter(q => q.getBoundingClientRect().height > 0).length;
  console.log("{PROBE_TAG} " + JSON.stringify({{images: document.images.length, broken, shown}}));
}});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium here: apt-get install -y chromium")


def run_browser(page: Path, *extra: str) -> tuple[str, list[str]]:
    """The DOM Chromium built for ``page`` and the console lines it logged."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", *extra, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    console = list(dict.fromkeys(m.group(1) for m in CONSOLE.finditer(done.stderr)))  # logged twice
    return done.stdout, console


class Blocks(HTMLParser):
    """Query blocks per direction, pictures, and any address the page would fetch."""

    def __init__(self):
        super().__init__()
        self.queries: dict[str, int] = {}
        self.images = 0
        self.correct = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "query" in classes:
            self.queries[a.get("data-direction")] = self.queries.get(a.get("data-direction"), 0) + 1
        if "correct" in classes and tag == "li":
            self.correct += 1
        if tag == "img":
            self.images += 1
        for key in ("src", "href", "srcset", "poster", "data"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(f"<{tag} {key}={a[key][:80]}>")
        if tag == "link" or (tag == "script" and a.get("src")):
            self.external.append(f"<{tag}>")


def check(page: Path, expect: int, screenshot: Path | None = None) -> dict:
    """The checks on one page; ``problems`` empty when it passes."""
    dom, console = run_browser(page, "--dump-dom")
    blocks = Blocks()
    blocks.feed(dom)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / page.name
        text = page.read_text(encoding="utf-8")
        probe.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE,
                         encoding="utf-8")
        _, probe_console = run_browser(probe, "--dump-dom")
    found = [json.loads(line.split(" ", 1)[1]) for line in probe_console if line.startswith(f"{PROBE_TAG} ")]
    problems = [f"console: {line}" for line in console]
    problems += [f"console (probe copy): {line}" for line in probe_console if not line.startswith(f"{PROBE_TAG} ")]
    want = {"text-to-image": expect, "image-to-text": expect}
    if blocks.queries != want:
        problems.append(f"query blocks {blocks.queries}, expected {want}")
    if blocks.external:
        problems.append(f"not self-contained: {blocks.external[:5]}")
    if not found:
        problems.append("the probe did not report (the page's load event never fired?)")
    else:
        if found[0]["broken"]:
            problems.append(f"{len(found[0]['broken'])} images did not decode: {found[0]['broken'][:5]}")
        if found[0]["shown"] != 2 * expect:
            problems.append(f"{found[0]['shown']} query blocks laid out with a height, expected {2 * expect}")
    if screenshot is not None:
        run_browser(page, f"--screenshot={screenshot.resolve()}", "--window-size=1200,1600")
        if not screenshot.is_file():
            problems.append(f"no screenshot written at {screenshot}")
        else:
            small_png(screenshot)
    return {"page": str(page), "bytes": page.stat().st_size, "queries": blocks.queries, "images": blocks.images,
            "decoded": (found[0]["images"] - len(found[0]["broken"])) if found else None,
            "correct_marked": blocks.correct, "console": console, "problems": problems}


def small_png(path: Path, colours: int = 128) -> None:
    """The screenshot as a palette PNG: a page of flat colours and small pictures keeps its look
    at a third of the bytes, so it can sit in docs/."""
    from PIL import Image

    with Image.open(path) as shot:
        small = shot.convert("RGB").quantize(colours)
    small.save(path, optimize=True)


def self_test() -> None:
    """A checker that stopped checking would pass anything: a broken page must fail each way."""
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.html"
        bad.write_text('<!DOCTYPE html><html><body><div class="query" data-direction="text-to-image">'
                       '<img src="data:image/png;base64,AAAA" alt="broken"><img src="elsewhere.png" alt="far"></div>'
                       '<script>throw new Error("on purpose")</script></body></html>', encoding="utf-8")
        problems = " | ".join(check(bad, 1)["problems"])
    for wanted in ("Uncaught Error: on purpose", "query blocks", "not self-contained", "did not decode"):
        if wanted not in problems:
            sys.exit(f"self-test: the check missed {wanted!r} on a broken page; it reported: {problems}")
    print("self-test: a broken page fails:", problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", nargs="?", type=Path)
    ap.add_argument("--expect", type=int, default=20, help="query blocks expected per direction (--html-queries)")
    ap.add_argument("--screenshot", type=Path, help="also save a 1200x1600 screenshot here")
    ap.add_argument("--self-test", action="store_true", help="check that a broken page fails")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        if args.page is None:
            return
    if args.page is None:
        ap.error("name the page to check")
    report = check(args.page, args.expect, args.screenshot)
    print(json.dumps(report, indent=1))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
