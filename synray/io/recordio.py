"""MXNet RecordIO as insightface packs face datasets (``train.rec``, ``train.idx``, ``property``), in plain Python.

Written from the format's specification (dmlc-core ``recordio.h``, ``mxnet/recordio.py``), so reading and
writing need no MXNet:

* a record is ``uint32 magic 0xced7230a``, ``uint32 lrec = cflag << 29 | length``, the payload, zero padding to
  4 bytes. A payload that holds the magic word at a 4-byte aligned offset is cut there into parts with
  ``cflag`` 1 (first), 2 (middle), 3 (last); the magic word itself is dropped and put back by the reader;
* the payload of an image record is an ``IRHeader`` (``struct '<IfQQ'``: flag, label, id, id2) followed by
  the encoded image; with ``flag > 0`` the label is ``flag`` float32 values placed before the image instead;
* ``train.idx`` holds one ``key<TAB>byte offset`` line per record; ``property`` is ``num_classes,h,w``.

insightface's layout (arcface_torch ``MXFaceDataset``): record 0 is a header whose label is ``(first identity
record, end)``; images are records ``1 .. first - 1`` with their class as a float label; identity records
``first .. end - 1`` have labels ``(start, end)``, the image records of that class.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from synray.errors import UserError
from synray.io import storage

__all__ = [
    "MAGIC", "IRHeader", "RecordIOError", "pack", "unpack", "encode_record", "read_record", "iter_records",
    "format_idx", "parse_idx", "format_property", "parse_property", "RecIndex", "index_from_header", "open_rec",
    "read_at", "read_labels", "encode_images", "rec_files",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
MAX_LENGTH = (1 << 29) - 1


class RecordIOError(UserError, ValueError):
    """A ``.rec``/``.idx``/``property`` file is malformed or does not match its index."""


@dataclass(frozen=True)
class IRHeader:
    """The image record header: ``label`` is a float, or float32 values when ``flag`` > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int = 0


def pack(header: IRHeader, payload: bytes) -> bytes:
    """``mx.recordio.pack``: a scalar label goes into the header, a vector label (flag = its length) before the data."""
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(_IR_FORMAT, 0, float(label), int(header.id), int(header.id2)) + bytes(payload)
    values = np.asarray(label, dtype=np.float32).ravel()
    return struct.pack(_IR_FORMAT, values.size, 0.0, int(header.id), int(header.id2)) + values.tobytes() + bytes(payload)


def unpack(record: bytes, what: str = "record") -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: the header (vector label as float32 when ``flag`` > 0) and the rest (the image)."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{what}: {len(record)} bytes, shorter than an IRHeader ({IR_SIZE})")
    flag, label, rid, rid2 = struct.unpack_from(_IR_FORMAT, record)
    rest = record[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"{what}: header announces {flag} label values, only {len(rest)} bytes follow")
        return IRHeader(flag, np.frombuffer(rest, np.float32, flag).copy(), rid, rid2), rest[4 * flag:]
    return IRHeader(flag, label, rid, rid2), rest


def _lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def encode_record(payload: bytes) -> bytes:
    """One record as dmlc's ``RecordIOWriter::WriteRecord`` writes it (split at aligned magic words, padded)."""
    data = bytes(payload)
    n = len(data)
    if n > MAX_LENGTH:
        raise RecordIOError(f"a record holds at most {MAX_LENGTH} bytes, got {n}")
    out = bytearray()
    start = 0
    pos = data.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= (n >> 2) << 2:
        if pos % 4 == 0:
            out += _lrec(1 if start == 0 else 2, pos - start) + data[start:pos]
            start = pos + 4
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    out += _lrec(3 if start else 0, n - start) + data[start:]
    out += b"\0" * (-(n - start) % 4)
    return bytes(out)


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    buf = fh.read(n)
    if len(buf) != n:
        raise RecordIOError(f"{what}: file ends inside a record ({len(buf)} of {n} bytes)")
    return buf


def read_record(fh: BinaryIO, what: str = "record") -> bytes | None:
    """The next record's payload (parts joined, magic words put back), or None at the end of the file."""
    parts: list[bytes] = []
    while True:
        head = fh.read(8)
        if not head and not parts:
            return None
        if len(head) != 8:
            raise RecordIOError(f"{what}: truncated record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{what}: bad magic {magic:#010x} (expected {MAGIC:#010x}): not RecordIO, or a wrong offset")
        cflag, length = lrec >> 29, lrec & MAX_LENGTH
        parts.append(_read_exact(fh, length, what))
        pad = -length % 4
        if pad:
            _read_exact(fh, pad, what)
        if cflag in (0, 3):
            if (cflag == 0) != (len(parts) == 1):
                raise RecordIOError(f"{what}: inconsistent continuation flags")
            return _MAGIC_BYTES.join(parts)
        if (cflag == 1) != (len(parts) == 1):
            raise RecordIOError(f"{what}: inconsistent continuation flags")


def iter_records(fh: BinaryIO, what: str = "record") -> Iterator[tuple[int, bytes]]:
    """``(offset, payload)`` of every record from the current position to the end."""
    while True:
        offset = fh.tell()
        rec = read_record(fh, what)
        if rec is None:
            return
        yield offset, rec


def format_idx(keys: Sequence[int], offsets: Sequence[int]) -> bytes:
    """``train.idx``: ``key\\toffset`` per line, as ``MXIndexedRecordIO.write_idx`` writes it."""
    return "".join(f"{int(k)}\t{int(o)}\n" for k, o in zip(keys, offsets)).encode()


def parse_idx(text: bytes | str, what: str = "train.idx") -> dict[int, int]:
    """``{key: byte offset}`` of an index file; a malformed line is an error naming it."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    out: dict[int, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            key, offset = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            raise RecordIOError(f"{what} line {n}: expected 'key<TAB>offset', got {line[:60]!r}") from None
        out[key] = offset
    return out


def format_property(num_classes: int, height: int, width: int) -> bytes:
    return f"{int(num_classes)},{int(height)},{int(width)}".encode()


def parse_property(text: bytes | str, what: str = "property") -> tuple[int, int, int]:
    """``(num_classes, height, width)`` of insightface's ``property`` file."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    try:
        values = tuple(int(v) for v in text.strip().split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise RecordIOError(f"{what}: expected 'num_classes,height,width', got {text.strip()[:60]!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class RecIndex:
    """What a ``.rec`` holds, read from its index and header record without touching the images.

    ``image_keys``: the records that hold images, in order; ``labels``: their classes when the header's identity
    records say them (insightface layout), else None (then each image record's own header has its label).
    """

    image_keys: np.ndarray
    offsets: Mapping[int, int]
    labels: np.ndarray | None
    num_classes: int | None
    image_size: tuple[int, int] | None
    file_size: int | None = None  # bytes of the .rec

    @property
    def rows(self) -> int:
        return int(self.image_keys.size)


def index_from_header(offsets: Mapping[int, int], header0: IRHeader | None, identity_labels: Mapping[int, np.ndarray],
                      prop: tuple[int, int, int] | None, what: str) -> RecIndex:
    """The :class:`RecIndex` of insightface's layout (``header0`` with ``flag > 0``) or of a plain indexed file."""
    size = (prop[1], prop[2]) if prop else None
    if header0 is None or header0.flag <= 0:
        keys = np.array(sorted(offsets), np.int64)
        return RecIndex(keys, offsets, None, prop[0] if prop else None, size)
    first, end = int(header0.label[0]), int(header0.label[1])
    if not 1 <= first <= end:
        raise RecordIOError(f"{what}: header record 0 says images 1..{first - 1} and identities {first}..{end - 1}")
    keys = np.arange(1, first, dtype=np.int64)
    missing = [int(k) for k in keys if int(k) not in offsets][:5]
    if missing:
        raise RecordIOError(f"{what}: image records {missing} are not in the index")
    labels = np.full(keys.size, -1, np.int64)
    for cls, key in enumerate(range(first, end)):
        rng = identity_labels.get(key)
        if rng is None:
            raise RecordIOError(f"{what}: identity record {key} is missing")
        start, stop = int(rng[0]), int(rng[1])
        if not 1 <= start <= stop <= first:
            raise RecordIOError(f"{what}: identity record {key} covers images {start}..{stop - 1}, outside 1..{first - 1}")
        labels[start - 1:stop - 1] = cls
    if (labels < 0).any():
        raise RecordIOError(f"{what}: image records {(np.flatnonzero(labels < 0)[:5] + 1).tolist()} belong to no identity record")
    num_classes = end - first
    if prop and prop[0] != num_classes:
        raise RecordIOError(f"{what}: property says {prop[0]} classes, the header's identity records {num_classes}")
    return RecIndex(keys, offsets, labels, num_classes, size)


def encode_images(keys: Sequence[int], labels: Sequence[float], images: Sequence[bytes]) -> tuple[bytes, list[int]]:
    """Image records (scalar float labels, ``id`` = key) back to back, and each one's offset in the result."""
    blob, offsets, pos = [], [], 0
    for key, label, image in zip(keys, labels, images):
        rec = encode_record(pack(IRHeader(0, float(label), int(key), 0), image))
        offsets.append(pos)
        blob.append(rec)
        pos += len(rec)
    return b"".join(blob), offsets


def rec_files(rec_uri: str) -> tuple[str, str]:
    """``(index, property)`` URIs beside a ``.rec``: ``train.rec`` -> ``train.idx`` and ``property``."""
    base = rec_uri[:-4] if rec_uri.endswith(".rec") else rec_uri
    folder = rec_uri.rsplit("/", 1)[0] if "/" in rec_uri else "."
    return f"{base}.idx", storage.join(folder, "property")


def read_at(fh: BinaryIO, offset: int, what: str) -> bytes:
    """The payload of the record at ``offset`` (an index entry)."""
    fh.seek(offset)
    rec = read_record(fh, what)
    if rec is None:
        raise RecordIOError(f"{what}: offset {offset} is past the end of the file")
    return rec


def open_rec(rec_uri: str) -> RecIndex:
    """Index, ``property`` and header records of a ``.rec`` (local or ``s3://``); no image is read.

    Without an index file the records are scanned once to build one (headers only are kept).
    """
    idx_uri, prop_uri = rec_files(rec_uri)
    if not storage.exists(rec_uri):
        raise RecordIOError(f"RecordIO file not found: {rec_uri}")
    prop = parse_property(storage.read_bytes(prop_uri), prop_uri) if storage.exists(prop_uri) else None
    loc = storage.resolve(rec_uri)
    file_size = loc.fs.get_file_info(loc.path).size
    with loc.fs.open_input_file(loc.path) as fh:
        if storage.exists(idx_uri):
            offsets = parse_idx(storage.read_bytes(idx_uri), idx_uri)
        else:
            offsets = {}
            for n, (offset, rec) in enumerate(iter_records(fh, rec_uri)):
                offsets[unpack(rec, f"{rec_uri} record at {offset}")[0].id if n else 0] = offset
        if not offsets:
            raise RecordIOError(f"{rec_uri}: no records")
        header0 = None
        if 0 in offsets:
            header0 = unpack(read_at(fh, offsets[0], f"{rec_uri} record 0"), f"{rec_uri} record 0")[0]
        identity_labels: dict[int, np.ndarray] = {}
        if header0 is not None and header0.flag > 0:
            first, end = int(header0.label[0]), int(header0.label[1])
            for key in range(first, end):
                if key not in offsets:
                    raise RecordIOError(f"{rec_uri}: identity record {key} is not in the index {idx_uri}")
                h = unpack(read_at(fh, offsets[key], f"{rec_uri} record {key}"), f"{rec_uri} record {key}")[0]
                if h.flag < 2:
                    raise RecordIOError(f"{rec_uri}: identity record {key} has no (start, end) label")
                identity_labels[key] = np.asarray(h.label[:2])
    return dataclasses.replace(index_from_header(offsets, header0, identity_labels, prop, rec_uri), file_size=file_size)


def read_labels(rec_uri: str, keys: Sequence[int], offsets: Mapping[int, int]) -> np.ndarray:
    """The float labels (as int64 classes) in the headers of the given image records, reading headers only."""
    loc = storage.resolve(rec_uri)
    out = np.empty(len(keys), np.int64)
    with loc.fs.open_input_file(loc.path) as fh:
        for n, key in enumerate(keys):
            what = f"{rec_uri} record {int(key)}"
            fh.seek(offsets[int(key)])
            head = _read_exact(fh, 8, what)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"{what}: bad magic {magic:#010x}: the index does not match the file")
            if lrec & MAX_LENGTH >= IR_SIZE + 4:  # the header (and a first vector label value) lie in the first part
                payload = _read_exact(fh, IR_SIZE + 4, what)
            else:
                payload = read_at(fh, offsets[int(key)], what)
            if len(payload) < IR_SIZE:
                raise RecordIOError(f"{what}: {len(payload)} bytes, shorter than an IRHeader ({IR_SIZE})")
            flag, label, _, _ = struct.unpack_from(_IR_FORMAT, payload)
            if flag > 0:
                if len(payload) < IR_SIZE + 4:
                    raise RecordIOError(f"{what}: header announces {flag} label values, none follow")
                label = struct.unpack_from("<f", payload, IR_SIZE)[0]
            out[n] = int(label)
    return out
