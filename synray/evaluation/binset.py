"""insightface ``.bin`` verification sets: a pickle of ``(list[encoded image bytes], list[bool])``.

Images come in pair order a0, b0, a1, b1, ...; ``issame[k]`` says whether pair k shares an identity.
This is the format of LFW, CFP-FP, AgeDB-30, CALFW and CPLFW as distributed with insightface.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import cv2
import numpy as np

from synray.errors import UserError
from synray.io.images import ImageDecodeError, decode_image, encode_image


class BinSetError(UserError, ValueError):
    """A ``.bin`` file is unreadable or malformed."""


def write_bin(path: str | os.PathLike, images: Sequence[np.ndarray], issame: Sequence[bool], fmt: str = ".jpg") -> None:
    """Write RGB images (pair order) and pair labels in the insightface layout, atomically."""
    if len(images) != 2 * len(issame):
        raise BinSetError(f"{len(images)} images for {len(issame)} pairs; need exactly two per pair")
    blob = ([encode_image(np.asarray(im, np.uint8), fmt) for im in images], [bool(s) for s in issame])
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        pickle.dump(blob, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def read_bin(path: str | os.PathLike, image_size: tuple[int, int] | None = (112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [2N,H,W,3] RGB, issame bool [N])``; resizes to ``image_size`` (H, W) if given."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            bins, issame = pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise BinSetError(f"{path} is not an insightface .bin verification set: {exc}") from exc
    if len(bins) != 2 * len(issame):
        raise BinSetError(f"{path}: {len(bins)} images for {len(issame)} pairs")
    out = []
    for i, b in enumerate(bins):
        try:
            im = decode_image(bytes(b), f"{path} image {i}")
        except ImageDecodeError as exc:
            raise BinSetError(str(exc)) from exc
        if image_size is not None and im.shape[:2] != tuple(image_size):
            im = cv2.resize(im, (image_size[1], image_size[0]), interpolation=cv2.INTER_LINEAR)
        out.append(im)
    return np.stack(out), np.asarray(issame, dtype=bool)
