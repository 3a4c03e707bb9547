"""insightface ``.bin`` verification sets: a pickle of ``(list[encoded image bytes], list[bool])``.

Images come in pair order a0, b0, a1, b1, ...; ``issame[k]`` says whether pair k shares an identity.
This is the format of LFW, CFP-FP, AgeDB-30, CALFW and CPLFW as distributed with insightface.

These files come from third-party mirrors, and unpickling runs whatever callables a pickle names, so
:func:`read_bin` never uses a plain ``pickle.load``: its unpickler resolves only what the insightface
layout can hold (Python 2 pickles need no callable at all; Python 3 protocol-2 pickles spell bytes as
``_codecs.encode(text, "latin1")``; repacked sets may hold numpy ``uint8`` arrays or numpy bools), and
the result must have that layout. Anything else is a :class:`BinSetError` naming the file.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import cv2
import numpy as np

from synray.errors import UserError
from synray.io.images import ImageDecodeError, decode_image, encode_image
from synray.models.inputs import fit_image


class BinSetError(UserError, ValueError):
    """A ``.bin`` file is unreadable or malformed."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: latin-1 only (no other codec runs)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not part of a .bin set")
    return text.encode("latin-1")


def _text(x: object) -> object:
    """Python 2 ``str`` arrives as ``bytes`` (``encoding="bytes"``): numpy's dtype codes compare as text."""
    return x.decode("latin-1") if isinstance(x, bytes) else x


class _Dtype:
    """A numpy dtype a ``.bin`` pickle names: ``uint8`` (images) or ``bool`` (labels), with numpy's own state.

    Stands in for ``numpy.dtype`` so that pickle's BUILD never feeds file data to numpy's ``__setstate__``.
    """

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        spec = _text(spec)
        if spec not in ("u1", "b1"):
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not part of a .bin set")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or tuple(map(_text, state)) != self.dtype.__reduce__()[2]:
            raise pickle.UnpicklingError(f"numpy dtype state {state!r} is not part of a .bin set")


class _NdarrayName:
    """What the name ``numpy.ndarray`` resolves to: a marker for ``_reconstruct``, never called."""


class _Array:
    """A 1-D ``uint8`` / ``bool`` numpy array from a ``.bin`` pickle, rebuilt from its raw bytes."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        ok = isinstance(state, tuple) and len(state) == 5
        if ok:
            _, shape, dtype, _fortran, raw = state
            ok = (isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int) and isinstance(dtype, _Dtype)
                  and isinstance(raw, bytes) and len(raw) == shape[0] * dtype.dtype.itemsize)
        if not ok:
            raise pickle.UnpicklingError("a numpy array that is not a 1-D uint8/bool array is not part of a .bin set")
        self.array = np.frombuffer(raw, dtype=dtype.dtype).copy()


def _reconstruct(cls: object, shape: object, dtype_char: object) -> _Array:
    if cls is not _NdarrayName:
        raise pickle.UnpicklingError(f"array type {cls!r} is not part of a .bin set")
    return _Array()


def _frombuffer(buf: object, dtype: object, shape: object, order: object = "C") -> np.ndarray:
    """Protocol-5 arrays (``numpy._core.numeric._frombuffer``): 1-D uint8/bool only."""
    ok = (isinstance(buf, (bytes, bytearray)) and isinstance(dtype, _Dtype) and isinstance(shape, tuple)
          and len(shape) == 1 and isinstance(shape[0], int) and len(buf) == shape[0] * dtype.dtype.itemsize)
    if not ok:
        raise pickle.UnpicklingError("a numpy array that is not a 1-D uint8/bool array is not part of a .bin set")
    return np.frombuffer(bytes(buf), dtype=dtype.dtype).copy()


def _scalar(dtype: object, data: object) -> np.generic:
    if not isinstance(dtype, _Dtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("a numpy scalar that is not a uint8/bool is not part of a .bin set")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


#: the only globals a ``.bin`` pickle may name, and what they resolve to (numpy 1 and 2 spellings)
_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _Dtype,
    ("numpy", "ndarray"): _NdarrayName,
    **{(mod, "_reconstruct"): _reconstruct for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "scalar"): _scalar for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "_frombuffer"): _frombuffer for mod in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _BinUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED`: a pickle naming anything else (``os.system``...) is refused unrun."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a .bin set") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of a .bin set")


def _plain(x: object) -> object:
    return x.array if isinstance(x, _Array) else x


def _is_image_blob(b: object) -> bool:
    return isinstance(b, bytes) or (isinstance(b, np.ndarray) and b.dtype == np.uint8)


def _is_label(x: object) -> bool:
    return isinstance(x, (bool, np.bool_))


def load_bin_blob(path: str | os.PathLike) -> tuple[list, list]:
    """The raw ``(encoded images, issame)`` of a ``.bin`` file, unpickled with the restricted unpickler and checked."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            blob = _BinUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise BinSetError(f"verification set not found: {path}") from None
    except Exception as exc:
        raise BinSetError(f"{path} is not an insightface .bin verification set: {exc}") from None
    if not isinstance(blob, (tuple, list)) or len(blob) != 2:
        raise BinSetError(f"{path} is not an insightface .bin verification set: expected a pair "
                          f"(images, issame), got {type(blob).__name__}")
    bins, issame = _plain(blob[0]), _plain(blob[1])
    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_:
        issame = list(issame)
    if isinstance(bins, (list, tuple)):
        bins = [_plain(b) for b in bins]
    if not isinstance(bins, (list, tuple)) or not all(_is_image_blob(b) for b in bins):
        raise BinSetError(f"{path} is not an insightface .bin verification set: the images must be a list of "
                          "encoded image bytes")
    if not isinstance(issame, (list, tuple)) or not all(_is_label(x) for x in issame):
        raise BinSetError(f"{path} is not an insightface .bin verification set: issame must be a list of bools")
    return list(bins), [bool(x) for x in issame]


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
    bins, issame = load_bin_blob(path)
    if len(bins) != 2 * len(issame):
        raise BinSetError(f"{path}: {len(bins)} images for {len(issame)} pairs")
    out = []
    for i, b in enumerate(bins):
        try:
            im = decode_image(b.tobytes() if isinstance(b, np.ndarray) else bytes(b), f"{path} image {i}")
        except ImageDecodeError as exc:
            raise BinSetError(str(exc)) from exc
        if image_size is not None:
            im = fit_image(im, image_size, shrink=cv2.INTER_LINEAR)  # insightface's load_bin: bilinear
        out.append(im)
    return np.stack(out), np.asarray(issame, dtype=bool)
