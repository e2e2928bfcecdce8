"""A progress bar for long inputs only: a few batches finish before a bar would be worth drawing.
A caller that draws its own (the CLI's ``progress_bar``) passes it in; otherwise one is made on
stderr, and removed when done."""

from __future__ import annotations

from contextlib import contextmanager

LONG = 256  # inputs; below this no bar is drawn


@contextmanager
def ticker(total: int, description: str, progress=None):
    """Yields ``advance(n)``: a no-op for short inputs, else a bar's step."""
    if progress is None and total < LONG:
        yield lambda n: None
        return
    if progress is not None:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.update(task, advance=n)
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)
