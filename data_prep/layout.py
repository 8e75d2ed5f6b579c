"""The d2l chapter's folder tree for ImageFolderDataset users, made of hard links instead of copies.

    train_valid_test/{train,valid,train_valid}/<class>/<id>.png   and   train_valid_test/test/unknown/<id>.png
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def link_or_copy(src: str, dst: str) -> bool:
    """Hard-link SRC at DST; copy where a link is impossible (another device, no permission). True if linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def write_folders(root: Path, entries: Iterable[tuple[str, str, str]]) -> tuple[int, int]:
    """Place each (split folder, class folder, source PNG path) under ROOT; return (linked, copied).

    Plain strings, not Paths: this runs once or twice per image (up to 400,000 links).
    """
    folders: dict[tuple[str, str], str] = {}
    linked = copied = 0
    for split, label, src in entries:
        folder = folders.get((split, label))
        if folder is None:
            path = root / split / label
            path.mkdir(parents=True, exist_ok=True)
            folder = folders[(split, label)] = f"{path}{os.sep}"
        if link_or_copy(src, folder + os.path.basename(src)):
            linked += 1
        else:
            copied += 1
    return linked, copied
