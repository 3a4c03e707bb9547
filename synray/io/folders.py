"""Image-folder datasets (``<root>/<identity>/<image>``, the CASIA-WebFace / torchvision ``ImageFolder`` layout).

The canonical order is sorted identity folders, then sorted files. Folders named by integers (``0000045``)
keep those numbers as identities, so a synray dataset exported to folders reads back with its own identity
ids; any other names become class indices in sorted order.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from synray.errors import UserError
from synray.io import storage

__all__ = ["IMAGE_EXTENSIONS", "FolderError", "FolderIndex", "list_folder", "identity_folder", "image_extension"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class FolderError(UserError, ValueError):
    """An image-folder dataset is missing, empty or not laid out as ``<identity>/<image>``."""


@dataclass(frozen=True)
class FolderIndex:
    """The images of a folder dataset in canonical order: relative paths and their identities."""

    root: str
    files: tuple[str, ...]  # "<identity folder>/<file>"
    identity: np.ndarray  # int64 per file
    folders: tuple[str, ...]  # sorted identity folder names
    numeric: bool  # folder names are the identities (else class indices)

    @property
    def rows(self) -> int:
        return len(self.files)


def _folder_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (0, name)


def list_folder(uri: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> FolderIndex:
    """List ``<uri>/<identity>/<image>`` (local or ``s3://``); files at other depths are not images of it."""
    loc = storage.resolve(uri)
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type != pafs.FileType.Directory:
            raise FolderError(f"image folder {uri} {'is a file' if info.type == pafs.FileType.File else 'does not exist'}")
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except FolderError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors of any kind name the folder
        raise FolderError(f"cannot list image folder {uri}: {exc}") from None
    exts = tuple(e.lower() for e in extensions)
    root = loc.path.replace(os.sep, "/").rstrip("/")
    by_dir: dict[str, list[str]] = {}
    for i in infos:
        if i.type != pafs.FileType.File or not i.path.lower().endswith(exts):
            continue
        parts = posixpath.relpath(i.path.replace(os.sep, "/"), root).split("/")
        if len(parts) == 2 and not parts[0].startswith((".", "_")) and not parts[1].startswith("."):
            by_dir.setdefault(parts[0], []).append(parts[1])
    if not by_dir:
        raise FolderError(f"no images ({', '.join(exts)}) in identity sub-folders of {uri} (expected <identity>/<image>)")
    folders = sorted(by_dir, key=_folder_key)
    numeric = all(f.isdigit() for f in folders)
    if numeric and len({int(f) for f in folders}) != len(folders):
        numeric = False  # "7" and "007": names, not numbers
    files, ident = [], []
    for k, folder in enumerate(folders):
        names = sorted(by_dir[folder])
        files += [f"{folder}/{n}" for n in names]
        ident += [int(folder) if numeric else k] * len(names)
    return FolderIndex(uri, tuple(files), np.asarray(ident, np.int64), tuple(folders), numeric)


def identity_folder(identity: int, width: int = 7) -> str:
    """``0000045``: zero-padded so that sorting names sorts identities (CASIA-WebFace's style)."""
    return f"{int(identity):0{width}d}"


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (by their magic number)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:2] == b"BM":
        return ".bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    raise FolderError("image bytes of an unknown format (not PNG, JPEG, BMP or WebP)")
