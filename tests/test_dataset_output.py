"""A synthesis output opens as it is in standard readers: pyarrow, pandas, DuckDB, Ray Data (``<out>/data``)
and Hugging Face ``datasets`` (``<out>``, through the dataset card, with ``image`` as images)."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from synray.io import shards
from synray.io.images import decode_image, encode_image
from synray.jobs import load_job
from synray.synthesis.pipeline import run_local

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A small, real world-generator output and its rows as synray reads them."""
    out = tmp_path_factory.mktemp("output") / "world"
    cfg = load_job(ROOT / "conf/synth/world.yaml", ["tracking.enabled=false", "identities.count=6",
                                                           "identities.unit_size=2", "generator.images_per_identity=3",
                                                           f"output.uri={out}"])
    run_local(cfg)
    rows = {}
    for uri in shards.open_dataset(str(out)).files:
        t = shards.read_shard(uri).to_pydict()
        for i, s, im in zip(t["identity"], t["sample"], t["image"]):
            rows[(i, s)] = im
    assert len(rows) == 18
    return out, rows


def test_pyarrow_pandas_and_duckdb_read_the_shards_folder(output):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    out, rows = output
    data = str(out / "data")
    for table in (pq.read_table(data), pads.dataset(data).to_table()):
        got = dict(zip(zip(table["identity"].to_pylist(), table["sample"].to_pylist()), table["image"].to_pylist()))
        assert got == rows
    frame = pd.read_parquet(data)
    assert sorted(zip(frame["identity"], frame["sample"])) == sorted(rows)
    assert {bytes(b) for b in frame["image"]} == set(rows.values())
    con = duckdb.connect()
    got = con.execute(f"SELECT identity, sample, image FROM read_parquet('{data}/*.parquet')").fetchall()
    assert {(i, s): bytes(b) for i, s, b in got} == rows
    assert con.execute(f"SELECT count(DISTINCT identity) FROM '{data}/*.parquet'").fetchone()[0] == 6


def test_hugging_face_datasets_loads_the_output_with_images(output, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch (read when datasets is imported)
    import datasets

    out, rows = output
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 18
    for row in ds:
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), decode_image(rows[(row["identity"], row["sample"])]))
    # the shards folder alone: the plain parquet loader, with the one-line cast to images
    plain = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path / "hf2"))
    plain = plain.cast_column("image", datasets.Image())
    assert isinstance(plain.features["image"], datasets.Image) and plain[0]["image"].size == (112, 112)


def test_dataset_card_describes_the_output(output):
    out, rows = output
    text = (out / shards.CARD).read_text()
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/part-*.parquet"}]
    names = [f["name"] for f in meta["dataset_info"]["features"]]
    assert names == shards.SHARD_SCHEMA.names and meta["dataset_info"]["features"][0]["dtype"] == "image"
    manifest = shards.read_manifest(str(out))
    assert f"| images | {manifest['rows']} |" in body and f"| identities | {manifest['identities']} |" in body
    assert "## Licence" in body and manifest["config_hash"] in body
    # every file beside data/ is one the readers skip (leading underscore) or the card
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["README.md", "_SUCCESS", "_config.yaml", "_manifest.json", "_samples.png", "data"])


@pytest.mark.ray
def test_ray_data_reads_the_output_and_training_names_a_corrupt_row(ray_session, output, tmp_path):
    import ray.data

    from synray.training.data import build_dataset, dataset_info

    out, rows = output
    got = ray.data.read_parquet(str(out / "data"), columns=["identity", "sample", "image"]).take_all()
    assert {(r["identity"], r["sample"]): r["image"] for r in got} == rows
    # training's own reading: a corrupt image fails naming its shard and row
    bad = str(tmp_path / "bad")
    rng = np.random.default_rng(0)
    for unit in (0, 1):
        images = [encode_image(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
        if unit == 1:
            images[2] = b"not an image"
        shards.write_shard(bad, unit, {"image": images, "identity": [2 * unit, 2 * unit, 2 * unit + 1, 2 * unit + 1],
                                       "sample": [0, 1, 0, 1], "kind": ["generated"] * 4, "seed": [0, 1, 2, 3],
                                       "height": [8] * 4, "width": [8] * 4})
    shards.finish_dataset(bad)
    info = dataset_info(bad)
    ds = build_dataset(info, image_size=(8, 8), shuffle="none", batch_size=8, num_cpus=0.5)
    with pytest.raises(Exception, match=r"data/part-000001\.parquet row 2 \(identity 3, sample 0\)"):
        ds.take_all()
    # decoded once for caching (data.cache_decoded), by Ray Data tasks or, small sets, by the driver: the same error
    for local in (0, 1 << 20):
        with pytest.raises(Exception, match=r"data/part-000001\.parquet row 2 \(identity 3, sample 0\)"):
            build_dataset(info, image_size=(8, 8), shuffle="none", batch_size=8, num_cpus=0.5, cache=True,
                          local_decode_bytes=local).take_all()


@pytest.mark.ray
def test_a_small_cached_set_decoded_by_the_driver_equals_the_ray_data_decode(ray_session, output, monkeypatch):
    """The driver decodes a small cached set itself (no Ray Data read); rows, labels and pixels equal the Ray Data
    decode's, in blocks as large, and each epoch still augments them."""
    from synray.training import data
    from synray.training.data import build_dataset, dataset_info

    out, _ = output
    info = dataset_info(str(out))
    kw = dict(image_size=(24, 24), shuffle="none", batch_size=4, num_cpus=0.5, cache=True)
    tasks = build_dataset(info, local_decode_bytes=0, **kw)
    with monkeypatch.context() as m:
        m.setattr(data, "read_dataset", lambda *a, **k: pytest.fail("a small cached set was read by Ray Data"))
        here = build_dataset(info, local_decode_bytes=1 << 20, **kw)
    per_shard = [shards.read_shard(f).num_rows for f in info.files]
    assert here.num_blocks() == sum(-(-n // 4) for n in per_shard) > len(per_shard)  # decode-batch-sized blocks

    def rows(ds):
        return sorted((int(r["label"]), r["image"].tobytes()) for r in ds.take_all())

    assert len(rows(here)) == info.rows and rows(here) == rows(tasks)
    flipped = build_dataset(info, local_decode_bytes=1 << 20, augment={"flip": True, "rrc_prob": 0.0}, **kw)
    assert rows(flipped) != rows(here)  # augmented per epoch after the cache
