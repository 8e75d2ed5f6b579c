"""The seed's folder tree for ImageFolderDataset users, made of hard links instead of copies.

    train_valid_test/{train,valid,train_valid}/<class>/<id>.png   and   train_valid_test/test/unknown/<id>.png
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link SRC at DST; copy where a link is impossible (another device, no permission). True if linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def write_folders(root: Path, entries: Iterable[tuple[str, str, Path]]) -> tuple[int, int]:
    """Place each (split folder, class folder, source PNG) under ROOT; return (linked, copied)."""
    made: set[Path] = set()
    linked = copied = 0
    for split, label, src in entries:
        folder = root / split / label
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        if link_or_copy(src, folder / src.name):
            linked += 1
        else:
            copied += 1
    return linked, copied
