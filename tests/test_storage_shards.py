"""Storage URIs and idempotent Parquet shards, locally and on a real S3 endpoint (moto server)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from synray.io import shards, storage
from synray.io.images import decode_image, encode_image


def make_columns(unit: int, n_ids: int = 3, per_id: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed + unit)
    images, ids, samples = [], [], []
    raw = []
    for i in range(n_ids):
        for s in range(per_id):
            im = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
            raw.append(im)
            images.append(encode_image(im))
            ids.append(unit * n_ids + i)
            samples.append(s)
    n = len(ids)
    cols = {"image": images, "identity": ids, "sample": samples, "kind": ["generated"] * n,
            "seed": list(range(n)), "height": [16] * n, "width": [12] * n,
            "quality": np.linspace(0.1, 0.9, n).astype(np.float32)}
    return cols, raw


@pytest.fixture(params=["local", "s3"])
def dataset_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ds")
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3['bucket']}/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_roundtrip_bit_exact(dataset_uri):
    expected = {}
    for unit in (0, 1, 2):
        cols, raw = make_columns(unit)
        uri = shards.write_shard(dataset_uri, unit, cols, {"generator": "test", "config_hash": "abc"})
        assert uri.endswith(shards.shard_name(unit))
        for (i, s), im in zip(zip(cols["identity"], cols["sample"]), raw):
            expected[(i, s)] = im
    assert list(shards.list_shards(dataset_uri)) == [0, 1, 2]
    table = shards.read_shard(shards.shard_uri(dataset_uri, 1))
    assert table.schema.metadata[b"synray.schema_version"] == b"1"
    meta = shards.shard_metadata(shards.shard_uri(dataset_uri, 1))
    assert meta["generator"] == "test" and meta["unit"] == 1 and meta["stats"]["rows"] == 6
    got = 0
    for unit, uri in shards.list_shards(dataset_uri).items():
        t = shards.read_shard(uri).to_pydict()
        for b, i, s in zip(t["image"], t["identity"], t["sample"]):
            assert np.array_equal(decode_image(b), expected[(i, s)])
            got += 1
    assert got == len(expected) == 18
    manifest = shards.write_manifest(dataset_uri, {"generator": "test"})
    assert manifest["rows"] == 18 and manifest["identities"] == 9 and manifest["shards"] == 3
    assert manifest["kinds"] == {"generated": 18}
    assert abs(manifest["quality"]["mean"] - 0.5) < 1e-6
    assert shards.read_manifest(dataset_uri)["units"] == [0, 1, 2]


@pytest.mark.ray
def test_read_dataset_through_ray(ray_session, dataset_uri):
    for unit in (0, 1):
        shards.write_shard(dataset_uri, unit, make_columns(unit)[0])
    shards.finish_dataset(dataset_uri)
    ds = shards.read_dataset(dataset_uri, columns=["identity", "sample", "image"])
    rows = ds.take_all()
    assert sorted((r["identity"], r["sample"]) for r in rows) == sorted(
        (i, s) for i in range(6) for s in range(2)
    )
    assert all(decode_image(r["image"]).shape == (16, 12, 3) for r in rows)


def test_foreign_and_corrupt_files_are_named(tmp_path):
    ds = str(tmp_path / "ds")
    shards.write_shard(ds, 0, make_columns(0)[0])
    (tmp_path / "ds" / "notes.txt").write_text("hello")
    with pytest.raises(shards.ShardError, match="notes.txt"):
        shards.list_shards(ds)
    os.remove(tmp_path / "ds" / "notes.txt")
    (tmp_path / "ds" / "data" / "part-000007.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(shards.ShardError, match="part-000007.parquet"):
        shards.validate_dataset(ds)
    os.remove(tmp_path / "ds" / "data" / "part-000007.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "ds" / "data" / "part-000008.parquet")
    with pytest.raises(shards.ShardError, match="part-000008.parquet.*not a synray shard"):
        shards.validate_dataset(ds)
    with pytest.raises(shards.ShardError, match="unknown kind"):
        cols = make_columns(1)[0]
        cols["kind"] = ["weird"] * len(cols["identity"])
        shards.build_table(cols)
    with pytest.raises(shards.ShardError, match="required"):
        shards.build_table({"identity": [1]})


def test_unreachable_storage_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(storage.StorageError, match="s3://nowhere/x"):
        storage.check_writable("s3://nowhere/x")


KILL_SCRIPT = textwrap.dedent(
    """
    import io, sys, time
    from synray.io import storage

    class SlowReader(io.RawIOBase):
        # Hands out half the payload, then stalls: the writer is killed mid-file.
        def __init__(self, data):
            self.data, self.pos = data, 0
        def readable(self):
            return True
        def seekable(self):
            return True
        def tell(self):
            return self.pos
        def seek(self, pos, whence=0):
            self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
            return self.pos
        def readinto(self, b):
            if self.pos >= len(self.data) // 2:
                print("writing", flush=True)
                time.sleep(60)
            n = min(len(b), len(self.data) // 2 - self.pos) or min(len(b), len(self.data) - self.pos)
            b[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    uri = sys.argv[1]
    if uri.startswith("s3://"):
        real_client = storage.s3_client
        def slow_client():
            client = real_client()
            put = client.put_object
            def put_object(Body, **kw):
                return put(Body=SlowReader(Body), ContentLength=len(Body), **kw)
            client.put_object = put_object
            return client
        storage.s3_client = slow_client
    else:
        import os
        real_fsync = os.fsync
        def stalled_fsync(fd):
            # the temp file holds the whole payload now, but it has not been renamed into place
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stalled_fsync
    storage.write_bytes_atomic(uri, b"PAR1" + b"x" * 200000)
    """
)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_writer_leaves_no_visible_shard(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        ds = f"s3://{s3['bucket']}/killed-{time.time_ns()}"
    else:
        ds = str(tmp_path / "ds")
    shards.write_shard(ds, 0, make_columns(0)[0])
    target = shards.shard_uri(ds, 1)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, target], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(shards.list_shards(ds)) == [0], "a partial shard became visible"
    assert not storage.exists(target)
    # the finished shard is intact and a re-run of unit 1 completes normally
    shards.write_shard(ds, 1, make_columns(1)[0])
    assert shards.write_manifest(ds)["rows"] == 12
