"""Dataset formats: insightface RecordIO and image-folder trees, written by ``synray export`` and read back by
readers that share no code with synray's (one written here from the format's specification, and MXNet's own when
``SYNRAY_MXNET_PYTHON`` names a Python with ``mxnet`` installed), and trained on directly (``rec://``, ``folder://``)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from synray.config.base import load_config
from synray.config.export import ExportConfig
from synray.config.train import TrainConfig
from synray.export import finish_rec, plan_export, write_part
from synray.io import recordio
from synray.io.images import decode_image, encode_image
from synray.io.shards import finish_dataset, write_shard
from synray.io.sources import SourceError, open_source, parse_uri, read_chunk
from synray.jobs import load_job, run_job
from synray.training.data import DataError, dataset_info
from synray.world.world import World

CONF = Path(__file__).resolve().parents[1] / "conf" / "train" / "world_tiny.yaml"
SIZE = 32
UNITS = [range(0, 6), range(6, 12), range(12, 16)]  # 16 identities in 3 shards
PER_ID = 8
MAGIC = 0xCED7230A


# --------------------------------------------------------------------------------------------
# an independent reader of insightface RecordIO, from the specification (dmlc-core recordio.h: magic, lrec =
# cflag << 29 | length, 4-byte padding, payloads cut at aligned magic words; mxnet recordio.py: IRHeader 'IfQQ')


def spec_record(fh, offset: int) -> bytes:
    fh.seek(offset)
    parts = []
    while True:
        magic, lrec = struct.unpack("<II", fh.read(8))
        assert magic == MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append(fh.read(length))
        fh.read((4 - length % 4) % 4)
        if cflag in (0, 3):
            return struct.pack("<I", MAGIC).join(parts)


def spec_unpack(payload: bytes) -> tuple[int, list[float], bytes]:
    flag, label, _, _ = struct.unpack("IfQQ", payload[:24])
    if flag > 0:
        labels = list(struct.unpack(f"{flag}f", payload[24:24 + 4 * flag]))
        return flag, labels, payload[24 + 4 * flag:]
    return flag, [label], payload[24:]


def mxface_items(root: Path) -> tuple[list[int], list[bytes], tuple[int, int, int]]:
    """What arcface_torch's MXFaceDataset reads: header record 0 -> image records 1..label[0]-1, label = float label."""
    index = {int(k): int(v) for k, v in (line.split("\t") for line in (root / "train.idx").read_text().splitlines())}
    prop = tuple(int(v) for v in (root / "property").read_text().split(","))
    with open(root / "train.rec", "rb") as fh:
        flag, head, _ = spec_unpack(spec_record(fh, index[0]))
        assert flag > 0
        labels, images = [], []
        for key in range(1, int(head[0])):
            _, label, image = spec_unpack(spec_record(fh, index[key]))
            labels.append(int(label[0]))
            images.append(image)
        for cls, key in enumerate(range(int(head[0]), int(head[1]))):  # identity records: (start, end) per class
            _, (start, end), _ = spec_unpack(spec_record(fh, index[key]))
            assert set(labels[int(start) - 1:int(end) - 1]) == {cls}
    return labels, images, prop


# --------------------------------------------------------------------------------------------
# data


def _pixels(data: bytes) -> str:
    return hashlib.md5(decode_image(data).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory):
    """A complete synray dataset of 16 world identities x 8 images (PNG), and what each image is."""
    root = tmp_path_factory.mktemp("formats")
    world = World(seed=0, num_identities=16)
    uri = str(root / "shards")
    expected = []
    for unit, ids in enumerate(UNITS):
        ident = [i for i in ids for _ in range(PER_ID)]
        # samples in reverse within a unit: the export sorts rows by identity, keeping each identity's own order
        smp = [PER_ID - 1 - j for _ in ids for j in range(PER_ID)]
        images = [encode_image(world.render(i, j, size=SIZE)) for i, j in zip(ident, smp)]
        expected += list(zip(ident, images))
        write_shard(uri, unit, {"image": images, "identity": ident, "sample": smp, "kind": ["generated"] * len(ident),
                                "seed": [0] * len(ident), "height": [SIZE] * len(ident), "width": [SIZE] * len(ident)},
                    {"generator": "world"})
    finish_dataset(uri)
    return {"root": root, "uri": uri, "expected": expected, "world": world}


def _export_here(source: str, dest: Path, fmt: str = "rec", *overrides: str) -> dict:
    """The export job's plan, parts and finish run in this process (no Ray): the files ``synray export`` writes."""
    cfg = load_job(None, [f"source={source}", f"output.uri={dest}", f"format={fmt}", *overrides], kind="export")
    plan = plan_export(cfg, open_source(cfg.source))
    settings = {"image_format": cfg.image_format, "image_size": None, "jpeg_quality": cfg.jpeg_quality}
    for task in plan["tasks"]:
        write_part(task, str(dest), fmt, settings)
    if fmt == "rec":
        finish_rec(str(dest), plan["tasks"], int(plan["identities"].size))
    return plan


# --------------------------------------------------------------------------------------------
# the format itself


def test_records_are_laid_out_as_the_spec_says():
    """Byte layout checked against hand-built records: header, flags, padding, and the cut at aligned magic words
    (the magic inside a payload at a non-aligned offset stays in place)."""
    magic = struct.pack("<I", MAGIC)
    assert recordio.encode_record(b"abcde") == struct.pack("<II", MAGIC, 5) + b"abcde" + b"\0\0\0"
    payload = b"1234" + magic + b"xy" + magic  # aligned magic at 4; a non-aligned one at 10
    expected = (struct.pack("<II", MAGIC, (1 << 29) | 4) + b"1234"
                + struct.pack("<II", MAGIC, (3 << 29) | 6) + b"xy" + magic + b"\0\0")
    assert recordio.encode_record(payload) == expected
    twice = magic + magic + b"z"  # two aligned magics: first (empty), middle (empty), last
    assert recordio.encode_record(twice) == (struct.pack("<II", MAGIC, 1 << 29) + struct.pack("<II", MAGIC, 2 << 29)
                                             + struct.pack("<II", MAGIC, (3 << 29) | 1) + b"z\0\0\0")
    import io

    for p in (b"", b"abcde", payload, twice, magic * 5):
        fh = io.BytesIO(recordio.encode_record(p) + recordio.encode_record(b"next"))
        assert recordio.read_record(fh) == p and recordio.read_record(fh) == b"next" and recordio.read_record(fh) is None
    header = recordio.pack(recordio.IRHeader(0, 7.0, 3, 0), b"img")
    assert header == struct.pack("IfQQ", 0, 7.0, 3, 0) + b"img" and recordio.IR_SIZE == 24
    vec = recordio.pack(recordio.IRHeader(0, [5, 9], 0, 0), b"")
    assert spec_unpack(vec) == (2, [5.0, 9.0], b"")
    with pytest.raises(recordio.RecordIOError, match="bad magic"):
        recordio.read_record(io.BytesIO(b"\0" * 16), "x.rec")


def test_exported_rec_reads_back_with_the_spec_reader(world_shards, tmp_path):
    """Shards -> train.rec/.idx/property: the images byte for byte (kept encoded) with their classes, each identity's
    images in their shard order, the header and identity records arcface_torch reads, and synray reads it too."""
    plan = _export_here(world_shards["uri"], tmp_path / "rec")
    labels, images, prop = mxface_items(tmp_path / "rec")
    ids = sorted({i for i, _ in world_shards["expected"]})
    assert prop == (len(ids), SIZE, SIZE)
    assert labels == [ids.index(i) for i, _ in world_shards["expected"]]
    assert images == [img for _, img in world_shards["expected"]]
    assert [t["first_key"] for t in plan["tasks"]] == [1, 1 + 6 * PER_ID, 1 + 12 * PER_ID]
    src = open_source(f"rec://{tmp_path / 'rec'}")  # the folder of train.rec
    assert (src.kind, src.rows, src.num_classes) == ("rec", len(labels), len(ids))
    back = src.read_rows(np.arange(src.rows)[::-1])
    assert back["identity"].tolist() == labels[::-1] and list(back["image"]) == images[::-1]
    chunk = src.chunks(50)[1]  # what a Ray Data read task gets: one byte range, then its records
    assert chunk["span"][0] == min(chunk["offsets"]) and chunk["span"][1] > max(chunk["offsets"])
    part = read_chunk(chunk)
    assert list(part["image"]) == images[50:100] and part["identity"].tolist() == labels[50:100]


def test_exported_folder_tree_round_trips(world_shards, tmp_path):
    """Shards -> ``<identity>/<n>.png``: identity folders named by the identities, numbered per identity; re-exported
    from the folder tree to RecordIO it holds the same images and classes."""
    _export_here(world_shards["uri"], tmp_path / "tree", "folder")
    files = sorted(p.relative_to(tmp_path / "tree").as_posix() for p in (tmp_path / "tree").rglob("*.png"))
    assert files == sorted(f"{i:07d}/{n:03d}.png" for i in range(16) for n in range(PER_ID))
    for n, (i, img) in enumerate(world_shards["expected"]):
        assert (tmp_path / "tree" / f"{i:07d}" / f"{n % PER_ID:03d}.png").read_bytes() == img
    src = open_source(f"folder://{tmp_path / 'tree'}")
    assert src.identities.tolist() == list(range(16)) and src.rows == 16 * PER_ID
    _export_here(f"folder://{tmp_path / 'tree'}", tmp_path / "rec")
    labels, images, _ = mxface_items(tmp_path / "rec")
    assert images == [img for _, img in world_shards["expected"]] and labels == [i for i, _ in world_shards["expected"]]


def test_re_encoding_and_resize(world_shards, tmp_path):
    """``image_format: jpg`` and ``image_size`` re-encode: JPEG bytes, the requested size in the property file."""
    cfg_over = ("image_format=jpg", "image_size=[48,40]")
    cfg = load_job(None, [f"source={world_shards['uri']}", f"output.uri={tmp_path / 'rec'}", *cfg_over], kind="export")
    plan = plan_export(cfg, open_source(cfg.source))
    settings = {"image_format": "jpg", "image_size": [48, 40], "jpeg_quality": 95}
    for task in plan["tasks"]:
        write_part(task, str(tmp_path / "rec"), "rec", settings)
    finish_rec(str(tmp_path / "rec"), plan["tasks"], 16)
    labels, images, prop = mxface_items(tmp_path / "rec")
    assert prop == (16, 48, 40) and all(img[:3] == b"\xff\xd8\xff" for img in images)
    ref = cv2.resize(decode_image(world_shards["expected"][0][1]), (40, 48), interpolation=cv2.INTER_LINEAR)
    assert np.abs(decode_image(images[0]).astype(int) - ref.astype(int)).mean() < 3  # JPEG at quality 95


def test_sources_refuse_what_they_cannot_read(world_shards, tmp_path):
    """Errors name the file: a missing .rec, an index that points into a record, a property file that disagrees,
    labels outside the class count, an empty folder; training reports them as data errors."""
    with pytest.raises(recordio.RecordIOError, match="not found"):
        open_source(f"rec://{tmp_path / 'none.rec'}")
    _export_here(world_shards["uri"], tmp_path / "rec")
    rec = tmp_path / "rec"
    (rec / "property").write_text("15,32,32")
    with pytest.raises(recordio.RecordIOError, match="property says 15 classes"):
        open_source(f"rec://{rec}/train.rec")
    (rec / "property").write_text("16,32,32")
    idx = (rec / "train.idx").read_text().splitlines()
    (rec / "train.idx").write_text("\n".join([idx[0], *[f"{k}\t{int(o) + 4}" for k, o in (l.split("\t") for l in idx[1:])]]))
    with pytest.raises(recordio.RecordIOError, match="bad magic"):
        open_source(f"rec://{rec}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        dataset_info(f"folder://{tmp_path / 'empty'}")
    with pytest.raises(SourceError, match="no path"):
        parse_uri("rec://")
    assert parse_uri("folder+s3://bucket/faces") == ("folder", "s3://bucket/faces")
    # a plain indexed .rec (no header record) whose labels exceed the property's class count
    keys, offs, blob = [], [], b""
    for k in range(3):
        rec_bytes = recordio.encode_record(recordio.pack(recordio.IRHeader(0, float(k * 2), k, 0),
                                                         world_shards["expected"][k][1]))
        keys.append(k)
        offs.append(len(blob))
        blob += rec_bytes
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.rec").write_bytes(blob)
    (plain / "train.idx").write_bytes(recordio.format_idx(keys, offs))
    src = open_source(f"rec://{plain}")
    assert src.identities.tolist() == [0, 2, 4] and src.row_identity().tolist() == [0, 2, 4]
    (plain / "property").write_text("3,32,32")
    cfg = load_job(None, [f"source=rec://{plain}", f"output.uri={tmp_path / 'x'}"], kind="export")
    with pytest.raises(Exception, match="outside the dataset's identity list"):
        plan_export(cfg, open_source(cfg.source))


def test_export_config_and_cli_arguments(tmp_path, monkeypatch):
    """``synray export URI DEST --format folder`` maps to config keys; relative paths become absolute, schemes kept."""
    from synray.cli import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["export", "rec://data/train.rec", "out", "--format", "folder"])
    assert (args.pos_source, args.pos_output_uri, args.pos_format) == ("rec://data/train.rec", "out", "folder")
    cfg = load_job(None, ["source=rec://data/train.rec", "output.uri=out", "format=folder"], kind="export")
    assert cfg.source == f"rec://{tmp_path}/data/train.rec" and cfg.output.uri == str(tmp_path / "out")
    from synray.config.base import ConfigError

    with pytest.raises(ConfigError, match="source"):
        load_job(None, ["output.uri=out"], kind="export")
    with pytest.raises(ConfigError, match="format"):
        load_job(None, ["source=x", "format=tfrecord"], kind="export")


# --------------------------------------------------------------------------------------------
# MXNet's own reader and writer (an isolated Python with mxnet, named by SYNRAY_MXNET_PYTHON)

MXNET_PYTHON = os.environ.get("SYNRAY_MXNET_PYTHON")
needs_mxnet = pytest.mark.skipif(not MXNET_PYTHON, reason="SYNRAY_MXNET_PYTHON (a Python with mxnet) not set")

MX_READ = r"""
import hashlib, json, numbers, os, sys
import numpy as np
import mxnet as mx
root = sys.argv[1]
rec = mx.recordio.MXIndexedRecordIO(os.path.join(root, "train.idx"), os.path.join(root, "train.rec"), "r")
header, _ = mx.recordio.unpack(rec.read_idx(0))   # arcface_torch MXFaceDataset.__init__
rows = []
for idx in range(1, int(header.label[0])):       # MXFaceDataset.__getitem__
    h, img = mx.recordio.unpack(rec.read_idx(idx))
    label = h.label if isinstance(h.label, numbers.Number) else h.label[0]
    rows.append([int(label), hashlib.md5(mx.image.imdecode(img).asnumpy().tobytes()).hexdigest()])
print(json.dumps(rows))
"""

MX_WRITE = r"""
import os, sys
import mxnet as mx
root, images = sys.argv[1], sys.argv[2:]
w = mx.recordio.MXIndexedRecordIO(os.path.join(root, "train.idx"), os.path.join(root, "train.rec"), "w")
labels = [k // 3 for k in range(len(images))]         # three images per identity, as face2rec packs them
n, c = len(images), max(labels) + 1
w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(2, [n + 1, n + 1 + c], 0, 0), b""))
for k, path in enumerate(images):
    w.write_idx(k + 1, mx.recordio.pack(mx.recordio.IRHeader(0, float(labels[k]), k + 1, 0), open(path, "rb").read()))
for cls in range(c):
    w.write_idx(n + 1 + cls, mx.recordio.pack(mx.recordio.IRHeader(2, [3 * cls + 1, 3 * cls + 4], n + 1 + cls, 0), b""))
w.close()
open(os.path.join(root, "property"), "w").write(f"{c},32,32")
"""


@needs_mxnet
def test_mxnet_reads_the_export_and_synray_reads_mxnet(world_shards, tmp_path):
    _export_here(world_shards["uri"], tmp_path / "rec")
    out = subprocess.run([MXNET_PYTHON, "-c", MX_READ, str(tmp_path / "rec")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = sorted({i for i, _ in world_shards["expected"]})
    assert json.loads(out.stdout) == [[ids.index(i), _pixels(img)] for i, img in world_shards["expected"]]
    files = []
    for k, (_, img) in enumerate(world_shards["expected"][:12]):
        files.append(str(tmp_path / f"{k}.png"))
        Path(files[-1]).write_bytes(img)
    (tmp_path / "mx").mkdir()
    out = subprocess.run([MXNET_PYTHON, "-c", MX_WRITE, str(tmp_path / "mx"), *files], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    src = open_source(f"rec://{tmp_path / 'mx' / 'train.rec'}")
    assert (src.rows, src.num_classes) == (12, 4)
    rows = src.read_rows(range(12))
    assert rows["identity"].tolist() == [k // 3 for k in range(12)]
    assert list(rows["image"]) == [img for _, img in world_shards["expected"][:12]]


# --------------------------------------------------------------------------------------------
# on Ray: the export job, and training straight from .rec and folders


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_export_job_resumes_and_round_trips(ray_session, world_shards, tmp_path):
    """``synray export`` as a job (Ray Data tasks, lease, MLflow): a part written before is kept, the rest written;
    the result equals the plain-function export; a second run is a no-op; another source into it is refused."""
    dest = tmp_path / "rec"
    cfg = load_job(None, [f"source={world_shards['uri']}", f"output.uri={dest}", "tracking.enabled=false"], kind="export")
    plan = plan_export(cfg, open_source(cfg.source))
    import synray.export as ex

    ex.storage.write_bytes_atomic(ex.storage.join(str(dest), ex.PARTS, ex.PLAN),
                                  json.dumps({"hash": plan["hash"], "source": cfg.source}).encode())
    write_part(plan["tasks"][1], str(dest), "rec", {"image_format": "keep", "image_size": None, "jpeg_quality": 95})
    outcome = run_job(cfg)
    assert (outcome.metrics["parts"], outcome.metrics["parts_written"]) == (3, 2)
    assert outcome.metrics["images_written"] == (6 + 4) * PER_ID and "exported 128 images of 16 identities" in outcome.table
    labels, images, _ = mxface_items(dest)
    assert images == [img for _, img in world_shards["expected"]] and labels == [i for i, _ in world_shards["expected"]]
    assert not (dest / ex.PARTS).exists()
    summary = json.loads((dest / ex.SUMMARY).read_text())
    assert summary["identities"] == list(range(16)) and summary["rows"] == 128
    again = run_job(cfg)
    assert again.metrics.get("skipped") is True
    folder = load_job(None, [f"source=rec://{dest}", f"output.uri={tmp_path / 'tree'}", "format=folder",
                             "tracking.enabled=false", "rows_per_task=50"], kind="export")
    assert run_job(folder).metrics["parts"] == 3  # 128 records in tasks of 50
    assert len(list((tmp_path / "tree").rglob("*.png"))) == 128
    other = load_job(None, [f"source=folder://{tmp_path / 'tree'}", f"output.uri={dest}", "tracking.enabled=false",
                            "image_format=jpg"], kind="export")
    with pytest.raises(ex.ExportError, match="holds another export"):
        run_job(other)


def _plain_folder_tree(world: World, root: Path, identities: range, per_id: int) -> None:
    """What a user's own script writes: ``<name>/<file>.jpg`` with OpenCV, nothing else."""
    for i in identities:
        os.makedirs(root / f"person_{i:03d}", exist_ok=True)
        for j in range(per_id):
            img = world.render(i, j, size=SIZE)
            cv2.imwrite(str(root / f"person_{i:03d}" / f"img{j:02d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_reads_rec_and_folders_directly(ray_session, world_shards, tmp_path):
    """``data.train: rec://...`` and ``folder://...`` train through Ray Data with no conversion: classes from the
    header / folder names before Ray Train starts, every planned step run, the final backbone written."""
    _export_here(world_shards["uri"], tmp_path / "rec")
    _plain_folder_tree(world_shards["world"], tmp_path / "tree", range(20), 8)
    bins = world_shards["world"].write_verification_bins(tmp_path / "bins", num_pairs=40, size=SIZE,
                                                         sets={"world-check": 1.0})
    for uri, classes, rows in ((f"rec://{tmp_path / 'rec' / 'train.rec'}", 16, 128), (f"folder://{tmp_path / 'tree'}", 20, 160)):
        cfg = load_config(CONF, TrainConfig, [
            f"data.train={uri}", f"eval.bins=[{bins['world-check']}]", "tracking.enabled=false", "epochs=2",
            "scaling.num_workers=1", "batch_size=32", "data.shuffle=global", "data.decode_num_cpus=0.5",
            f"output.uri={tmp_path / 'train'}", f"name=from-{uri.split(':')[0]}"])
        outcome = run_job(cfg)
        plan = outcome.extra["plan"]
        assert (plan["num_classes"], plan["train_rows"]) == (classes, rows)
        assert outcome.metrics["step"] == 2 * (rows // 32) and np.isfinite(outcome.metrics["loss"])
        assert "world-check" in outcome.verification and os.path.exists(outcome.model_uri)
        # the final ROC: scores beside the model, a figure per verification set and the threshold table
        assert set(outcome.extra["roc"]) == {"roc_world-check.png", "thresholds.txt"}
        assert decode_image(Path(outcome.extra["roc"]["roc_world-check.png"]).read_bytes()).ndim == 3
        from synray.evaluation.roc import load_scores

        scores = load_scores(Path(outcome.extra["verification_scores"]).read_bytes())["world-check"]
        assert scores["issame"].size == 40 and scores["dist"].shape == (40,)
