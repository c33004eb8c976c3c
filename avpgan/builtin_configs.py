"""The built-in experiment configs: the repository's configs/ folder, shipped as `avpgan.configs`.

`--config` takes a path or one of these names, so that an installed avpgan can run the paper's
experiments from any folder without a checkout. A path that exists always wins, so a local file
named like a built-in one is never shadowed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SUFFIX = ".yaml"


def _folder() -> Traversable:
    return files("avpgan.configs")


def names() -> list[str]:
    """Every built-in config's name (its file name), sorted."""
    return sorted(p.name for p in _folder().iterdir() if p.name.endswith(SUFFIX))


def description(name: str) -> str:
    """The config's first line, which by convention is a comment saying what the experiment is."""
    first = (_folder() / name).read_text().split("\n", 1)[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def find(ref: str | Path) -> tuple[str, str] | None:
    """(source, text) of `ref`: an existing file, else the built-in config of that name (`.yaml`
    may be left off); None when it is neither. `source` is what error messages name: the path,
    or `built-in NAME`."""
    if Path(ref).is_file():
        return str(ref), Path(ref).read_text()
    name = str(ref) if str(ref).endswith(SUFFIX) else f"{ref}{SUFFIX}"
    if name in names():  # bare file names: a path with a folder in it never matches
        return f"built-in {name}", (_folder() / name).read_text()
    return None
