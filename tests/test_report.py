"""Pictures and reports: ROC curves and threshold tables from verification scores, identity statistics, and
``synray report`` on synray shards, ``rec://`` and ``folder://`` (the same images give the same report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synray.evaluation import identity_stats as S
from synray.evaluation.roc import (FAR_TARGETS, load_scores, pair_distances, roc_curve, save_scores, threshold_table)
from synray.evaluation.roc_plots import roc_artifacts
from synray.evaluation.verification import VAL_THRESHOLDS, calculate_val, evaluate
from synray.export import finish_rec, plan_export, write_part
from synray.io.images import decode_image, encode_image
from synray.io.shards import finish_dataset, write_shard
from synray.io.sources import open_source
from synray.jobs import load_job, run_job
from synray.world.world import World

SIZE = 32


def _pairs(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((2 * n, 16))
    same = rng.random(n) < 0.5
    emb[1::2][same] = emb[0::2][same] + noise * rng.standard_normal((int(same.sum()), 16))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), same


def test_threshold_table_follows_the_insightface_protocol():
    """TAR at FAR 1e-3 (10 folds, threshold interpolated on the training folds) equals ``calculate_val``; the ROC runs
    from (0, 0) to (1, 1), never decreasing; targets the impostor pairs cannot measure are marked, not reported as 0."""
    emb, same = _pairs(3000, 0.8)
    s = pair_distances(emb, same)
    table = {round(np.log10(r["far_target"])): r for r in threshold_table(s["dist"], s["issame"])}
    val, val_std, far = calculate_val(VAL_THRESHOLDS, emb[0::2], emb[1::2], same, 1e-3)
    assert (table[-3]["tar"], table[-3]["tar_std"], table[-3]["far"]) == pytest.approx((val, val_std, far))
    n_diff = int((~same).sum())
    assert [r["measurable"] for r in threshold_table(s["dist"], s["issame"])] == [t * n_diff >= 1 for t in FAR_TARGETS]
    assert table[-1]["cosine"] == pytest.approx(1 - table[-1]["threshold"] / 2)
    roc = roc_curve(s["dist"], s["issame"])
    assert (roc["far"][0], roc["tar"][0], roc["far"][-1], roc["tar"][-1]) == (0, 0, 1, 1)
    assert (np.diff(roc["far"]) >= 0).all() and (np.diff(roc["tar"]) >= 0).all()
    # the accuracy protocol's own ROC (mean over folds at fixed thresholds) lies on the same curve at its points
    res = evaluate(emb, same)
    k = np.searchsorted(roc["far"], res.fpr[150], side="right") - 1
    assert abs(roc["tar"][k] - res.tpr[150]) < 0.02
    assert load_scores(save_scores({"lfw": s}))["lfw"]["dist"].tolist() == s["dist"].tolist()


def test_roc_artifacts_draw_every_set_and_model():
    good, same_g = _pairs(600, 0.5, 1)
    bad, same_b = _pairs(600, 1.5, 2)
    files = roc_artifacts({"good": {"a": pair_distances(good, same_g), "b": pair_distances(good, same_g)},
                           "bad": {"a": pair_distances(bad, same_b)}})
    assert set(files) == {"roc_a.png", "roc_b.png", "thresholds.txt"}
    assert decode_image(files["roc_a.png"]).shape[2] == 3
    text = files["thresholds.txt"].decode()
    assert "a / good" in text and "a / bad" in text and "b / good" in text and "b / bad" not in text


def test_identity_statistics():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 32))
    labels = np.repeat(np.arange(5), 6)
    emb = centres[labels] + 0.3 * rng.standard_normal((30, 32))
    emb[labels == 4] = emb[labels == 0]  # identity 4 is identity 0 under another label
    ids, c = S.centres(emb, labels)
    assert S.duplicate_pairs(ids, c, 0.95) == [(0, 4, pytest.approx(1.0))]
    j, cos = S.nearest_other(c)
    assert j[0] == 4 and j[4] == 0 and cos[0] == pytest.approx(1.0)
    cons = S.consistency(emb, labels)
    k = 7
    assert cons[k] == pytest.approx(S.normalize(emb[k]) @ c[labels[k]])
    genuine, impostor = S.pair_cosines(emb, labels)
    assert genuine.size == 5 * 15 and genuine.mean() > impostor.mean()
    assert S.fisher_ratio(genuine, impostor) == pytest.approx(
        (genuine.mean() - impostor.mean()) ** 2 / (genuine.var() + impostor.var()))
    jr, cr = S.nearest_reference(c, 3.0 * centres[[2, 1]])
    assert jr[2] == 0 and jr[1] == 1 and cr[1] > 0.9


# --------------------------------------------------------------------------------------------
# synray report


@pytest.fixture(scope="module")
def report_data(tmp_path_factory):
    """12 world identities x 6 images as shards, where identity 11's images are identity 0's (a duplicate), and the
    same set exported to RecordIO and to a folder tree."""
    root = tmp_path_factory.mktemp("report")
    world = World(seed=0, num_identities=12)
    uri = str(root / "shards")
    for unit, ids in enumerate([range(0, 6), range(6, 12)]):
        ident = [i for i in ids for _ in range(6)]
        smp = [j for _ in ids for j in range(6)]
        images = [encode_image(world.render(0 if i == 11 else i, j, size=SIZE)) for i, j in zip(ident, smp)]
        write_shard(uri, unit, {"image": images, "identity": ident, "sample": smp, "kind": ["generated"] * len(ident),
                                "seed": [0] * len(ident), "height": [SIZE] * len(ident), "width": [SIZE] * len(ident)},
                    {"generator": "world"})
    finish_dataset(uri)
    out = {"shards": uri}
    for fmt in ("rec", "folder"):
        dest = root / fmt
        cfg = load_job(None, [f"source={uri}", f"output.uri={dest}", f"format={fmt}"], kind="export")
        plan = plan_export(cfg, open_source(uri))
        for task in plan["tasks"]:
            write_part(task, str(dest), fmt, {"image_format": "keep", "image_size": None, "jpeg_quality": 95})
        if fmt == "rec":
            finish_rec(str(dest), plan["tasks"], 12)
    out["rec"], out["folder"] = f"rec://{root / 'rec'}", f"folder://{root / 'folder'}"
    return out


def _flat(x, prefix=""):
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    if isinstance(x, list):
        return {k2: v2 for n, v in enumerate(x) for k2, v2 in _flat(v, f"{prefix}{n}.").items()}
    return {prefix.rstrip("."): x}


@pytest.mark.timeout(600)
def test_report_on_shards_rec_and_folders(report_data, world_teacher, tmp_path, capsys):
    """The same images under three formats give the same report; it prints a table, writes report.json and PNGs,
    logs them to MLflow, finds the duplicated identity, and the dataset itself as a reference leaks every identity."""
    from mlflow.tracking import MlflowClient

    from synray.cli import main

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reports = {}
    for kind in ("shards", "rec", "folder"):
        out = tmp_path / kind
        code = main(["report", report_data[kind], "--model", str(world_teacher), "--reference", report_data["shards"],
                     "--set", f"output.uri={out}", "--set", f"tracking.uri={db}", "--set", "tracking.experiment=report",
                     "--set", "duplicate_threshold=0.99", "--set", "leakage_threshold=0.99", "--quiet"])
        assert code == 0
        printed = capsys.readouterr().out
        assert "images / identities" in printed and "72 / 12" in printed and "near-duplicate identities" in printed
        reports[kind] = json.loads((out / "report.json").read_text())
        for name in ("images_per_identity.png", "samples.png", "similarity.png", "nearest_identity.png", "leakage.png"):
            assert decode_image((out / name).read_bytes()).ndim == 3, name
        grid = decode_image((out / "samples.png").read_bytes())
        assert grid.shape == (8 * (SIZE + 2) - 2, 6 * (SIZE + 2) - 2, 3)  # 8 identities x their 6 images
    r = reports["shards"]
    assert r["images_per_identity_histogram"] == {"6": 12} and r["kinds"] == {"generated": 72}
    assert [(p["a"], p["b"]) for p in r["near_duplicates"]["top"]] == [(0, 11)]
    assert r["leakage"]["leaked"] == 12 and r["leakage"]["nearest"]["min"] > 0.999
    for kind in ("rec", "folder"):
        for key in ("consistency", "separability", "nearest_identity", "near_duplicates", "leakage", "model"):
            got, want = _flat(reports[kind][key]), _flat(r[key])
            assert got.keys() == want.keys(), key
            for k, v in want.items():
                assert got[k] == (pytest.approx(v) if isinstance(v, float) else v), (kind, key, k)
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("report").experiment_id])
    assert len(runs) == 3
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.json", "report.txt", "samples.png", "similarity.png", "leakage.png"} <= arts
    assert runs[0].data.metrics["near_duplicate_pairs"] == 1


def test_report_counts_without_a_model(report_data, tmp_path):
    cfg = load_job(None, [f"source={report_data['rec']}", f"output.uri={tmp_path}", "tracking.enabled=false"],
                   kind="report")
    outcome = run_job(cfg)
    assert outcome.metrics == {"rows": 72, "identities": 12}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images_per_identity.png", "report.json", "report.txt",
                                                          "samples.png"]


def test_synthesis_logs_an_identities_by_samples_grid(tmp_path):
    """``_samples.png`` of a synthesis output (and its MLflow run's ``samples.png``): one row per identity, one column
    per image, the dataset's own images."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    conf = Path(__file__).resolve().parents[1] / "conf" / "synth" / "world.yaml"
    cfg = load_job(conf, ["local=true", "identities.count=6", "identities.unit_size=2", "generator.images_per_identity=3",
                          f"output.uri={tmp_path / 'world'}", f"tracking.uri={db}", "tracking.experiment=grid"])
    run_job(cfg)
    grid = decode_image((tmp_path / "world" / "_samples.png").read_bytes())
    src = open_source(str(tmp_path / "world"))
    first = src.read_rows([0])
    size = min(112, decode_image(bytes(first["image"][0])).shape[0])
    assert grid.shape == (6 * (size + 2) - 2, 3 * (size + 2) - 2, 3)
    tile = decode_image(bytes(first["image"][0]))  # identity 0's first image, at its own size
    assert tile.shape[0] == size and np.array_equal(grid[:size, :size], tile)
    client = MlflowClient(db)
    run = client.search_runs([client.get_experiment_by_name("grid").experiment_id])[0]
    assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
