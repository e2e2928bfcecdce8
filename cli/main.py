"""The ``featcache`` command: parse options, build a config dataclass, call the library.

Every command's work is a library call (``featcache.pipeline...``); nothing here computes.
The commands live by stage; importing them registers them on the shared typer app.
"""

import sys

# Importing registers the commands; the order here is the order of `featcache --help`.
from featcache.cli import (
    evaluation,  # noqa: E402,F401
    model,  # noqa: E402,F401
    stage_one,  # noqa: E402,F401,I001
    stage_two,  # noqa: E402,F401
)
from featcache.cli.app import app

__all__ = ["app"]


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
