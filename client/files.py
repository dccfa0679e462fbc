"""The client's local side: which files of a model directory a push sends, calibration examples
read from JSON lines, and where pulled bases are cached."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from client.errors import BadRequest
from core.files import UNREAD_SUFFIXES, is_unread

__all__ = [
    "BASE_MARKER",
    "INCOMPLETE",
    "SKIP_DIRS",
    "UNREAD_SUFFIXES",
    "default_cache_dir",
    "local_files",
    "read_calibration",
    "split_unread",
]

#: Suffix of a partly downloaded file (resumed with Range by the next pull).
INCOMPLETE = ".incomplete"
#: Directory names a push never uploads (VCS and download caches).
SKIP_DIRS = frozenset({".git", ".cache", ".huggingface", "__pycache__"})
#: Marker that says a cached base directory is complete and verified.
BASE_MARKER = ".slim-base.json"


def local_files(directory: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Files of a model directory as (posix relative path, path), sorted; skips VCS and cache
    directories and leftovers of interrupted pulls."""
    root = Path(directory)
    if not root.is_dir():
        raise BadRequest(f"{root} is not a directory; pass a model directory", code="invalid_path")
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.name.endswith(INCOMPLETE):
            continue
        out.append((rel.as_posix(), path))
    if not out:
        raise BadRequest(f"{root} holds no files", code="invalid_checkpoint")
    return out


def split_unread(
    files: list[tuple[str, Path]],
) -> tuple[list[tuple[str, Path]], list[str]]:
    """``files`` without those the server does not read (:data:`UNREAD_SUFFIXES`), and the
    relative paths of those left out."""
    keep = [(rel, p) for rel, p in files if not is_unread(rel)]
    return keep, [rel for rel, _ in files if is_unread(rel)]


def read_calibration(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``{"text": ..., "label": ...}`` JSON lines as the API's calibration list."""
    examples = []
    try:
        # JSON lines end at "\n" only: str.splitlines() also splits at U+0085/U+2028, which
        # real texts (tweets) contain inside their JSON strings
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise BadRequest(
            f"cannot read calibration file {path}: {exc.strerror}", code="invalid_calibration"
        ) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise BadRequest(
                f'{path}:{number} is not JSON; write one {{"text": ..., "label": ...}} per line',
                code="invalid_calibration",
            ) from exc
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise BadRequest(
                f'{path}:{number} needs a "text" string (and optionally a "label")',
                code="invalid_calibration",
            )
        examples.append({"text": item["text"], "label": item.get("label")})
    if not examples:
        raise BadRequest(f"{path} holds no examples", code="invalid_calibration")
    return examples


def default_cache_dir() -> Path:
    """``$SLIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/slimstore``, else ``~/.cache/slimstore``."""
    if env := os.environ.get("SLIM_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slimstore"
