"""Verification, IJB, TinyFace and the ``synray eval`` command against golden/eval_protocols.*.

Fold counts, FAR and FPR targets, ranks and array lengths come from the golden files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import golden_key, golden_keys
from torch import nn

from synray.cli import main
from synray.evaluation.binset import write_bin
from synray.evaluation.evaluate import evaluate_bins, find_bins, format_table
from synray.evaluation.identification import TINYFACE_RANKS, dir_far, rank_accuracy
from synray.evaluation.ijb import FPR_TARGETS, auc, ijb_scores, roc_curve, tpr_at_fpr
from synray.evaluation.verification import (
    evaluate,
    fuse_flip,
    kfold,
    slinear_interp,
    synface_accuracy,
    synface_cosine,
)
from synray.models.inputs import embed, fit_images
from synray.models.registry import build_backbone

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def npz(reference):
    with np.load(reference / "recognition" / "golden" / "eval_protocols.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def summary(reference):
    return json.loads((reference / "recognition" / "golden" / "eval_protocols.json").read_text())


@pytest.fixture(scope="module")
def verification(npz, summary):
    """The 1:1 verification summary; its key names the number of pairs."""
    key, p = golden_key(summary, "verification_{pairs}_pairs")
    assert p["pairs"] == len(npz["ver_issame"])
    return summary[key]


@pytest.fixture(scope="module")
def protocol(npz, verification):
    """``evaluate`` settings of the golden: the fold count and the FAR target of its TAR@FAR key."""
    tar_key, p = golden_key(verification["insightface"], "val_tar_at_far{far}")
    return {"n_folds": len(npz["insightface_fold_acc"]), "far_target": p["far"], "tar_key": tar_key}


@pytest.fixture(scope="module")
def flip_result(npz, protocol):
    return evaluate(fuse_flip(npz["ver_emb"], npz["ver_emb_flip"]), npz["ver_issame"],
                    n_folds=protocol["n_folds"], far_target=protocol["far_target"])


# ---------------------------------------------------------------- 1:1 verification

def test_flip_fusion(npz):
    np.testing.assert_allclose(fuse_flip(npz["ver_emb"], npz["ver_emb_flip"]), npz["ver_fused_normalized"], rtol=0, atol=1e-12)


def test_insightface_accuracy_roc_and_tar(npz, verification, protocol, flip_result):
    ref = verification["insightface"]
    np.testing.assert_allclose(flip_result.accuracy, npz["insightface_fold_acc"], rtol=0, atol=1e-12)
    assert flip_result.acc_mean == pytest.approx(ref["acc_mean"], abs=1e-12)
    assert flip_result.acc_std == pytest.approx(ref["acc_std"], abs=1e-12)
    np.testing.assert_allclose(flip_result.tpr, npz["insightface_tpr"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(flip_result.fpr, npz["insightface_fpr"], rtol=0, atol=1e-12)
    assert flip_result.tpr.shape == npz["insightface_tpr"].shape
    # TAR@FAR with the scipy<=1.8 interp1d('slinear') rule on duplicated FARs
    assert flip_result.val == pytest.approx(ref[protocol["tar_key"]], abs=1e-12)
    assert flip_result.val_std == pytest.approx(ref["val_std"], abs=1e-12)
    assert flip_result.far == pytest.approx(ref["far_mean"], abs=1e-12)


def test_insightface_noflip(npz, verification, protocol):
    ref = verification["insightface_noflip"]
    res = evaluate(fuse_flip(npz["ver_emb"]), npz["ver_issame"], n_folds=protocol["n_folds"],
                   far_target=protocol["far_target"])
    np.testing.assert_allclose(res.accuracy, npz["insightface_noflip_fold_acc"], rtol=0, atol=1e-12)
    assert res.acc_mean == pytest.approx(ref["acc_mean"], abs=1e-12)
    assert res.acc_std == pytest.approx(ref["acc_std"], abs=1e-12)
    assert res.val == pytest.approx(ref[protocol["tar_key"]], abs=1e-12)
    assert res.far == pytest.approx(ref["far_mean"], abs=1e-12)


def test_default_protocol_is_the_reference_one(npz, verification, protocol):
    """``evaluate``'s defaults are the golden's protocol: the stored folds and TAR@FAR of the insightface run."""
    res = evaluate(fuse_flip(npz["ver_emb"], npz["ver_emb_flip"]), npz["ver_issame"])
    np.testing.assert_allclose(res.accuracy, npz["insightface_fold_acc"], rtol=0, atol=1e-12)
    assert res.val == pytest.approx(verification["insightface"][protocol["tar_key"]], abs=1e-12)


def test_tface_and_adaface_thresholds_and_bad_cases(npz, verification, flip_result):
    ref = verification
    np.testing.assert_allclose(flip_result.accuracy, npz["tface_fold_acc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(flip_result.accuracy, ref["tface"]["fold_acc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(flip_result.best_thresholds, npz["tface_best_thresholds"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(flip_result.best_thresholds, ref["tface"]["best_thresholds"], rtol=0, atol=1e-12)
    assert flip_result.best_threshold_mean == pytest.approx(ref["tface"]["best_threshold_mean"], abs=1e-12)
    assert flip_result.best_threshold_mean == pytest.approx(ref["adaface"]["best_threshold_mean"], abs=1e-12)
    assert flip_result.acc_mean == pytest.approx(ref["adaface"]["acc_mean"], abs=1e-12)
    assert flip_result.bad_case == npz["tface_bad_case"].tolist()


def test_synface_cosine_rule(npz, verification):
    ref = verification["synface"]
    emb = npz["ver_emb"]
    np.testing.assert_allclose(synface_cosine(emb[0::2], emb[1::2]), npz["synface_predicts"][:, 0], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(npz["synface_predicts"][:, 1].astype(bool), npz["ver_issame"])
    acc, thresholds = synface_accuracy(npz["synface_predicts"], n_folds=len(ref["fold_acc"]))
    np.testing.assert_allclose(acc, ref["fold_acc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(thresholds, ref["best_cos_thresholds"], rtol=0, atol=1e-12)
    assert acc.mean() == pytest.approx(ref["acc_mean"], abs=1e-12)


def test_slinear_interp_scipy18_rule():
    x = np.array([0.0, 0.0, 0.1, 0.1, 0.1, 0.3])
    y = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert slinear_interp(x, y, 0.05) == pytest.approx(1.5)  # last x=0 (y=1) -> first x=0.1 (y=2)
    assert slinear_interp(x, y, 0.1) == pytest.approx(4.0)  # exact hit: last repeat
    assert slinear_interp(x, y, 0.2) == pytest.approx(4.5)
    # stable sort keeps the given order of repeats: x=0 rows become (y=1, y=0), x=0.1 rows (4, 3, 2)
    assert slinear_interp(x[::-1], y[::-1], 0.05) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="outside the interpolation range"):
        slinear_interp(x, y, 0.5)


def test_slinear_interp_equals_degree1_bspline_with_repeated_knots():
    """scipy<=1.8 evaluated make_interp_spline(k=1) = BSpline(t=[x0, x..., x_last], c=y, k=1)."""
    from scipy.interpolate import BSpline

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 30))
        x, y = np.round(rng.random(n) * 5) / 5, rng.random(n)
        xs, ys = x[np.argsort(x, kind="mergesort")], y[np.argsort(x, kind="mergesort")]
        if xs[0] == xs[-1]:
            continue
        v = float(rng.choice(np.r_[xs, rng.uniform(xs[0], xs[-1], 5)]))
        want = BSpline.construct_fast(np.r_[xs[0], xs, xs[-1]], ys, 1)(v)
        assert slinear_interp(x, y, v) == pytest.approx(float(want), abs=1e-12)


def test_kfold_matches_sklearn_sizes():
    sizes = [len(test) for _, test in kfold(23, 10)]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="need at least 10 pairs"):
        kfold(5, 10)


def test_bad_pair_layout():
    with pytest.raises(ValueError, match="pair order"):
        evaluate(np.zeros((7, 4)), np.zeros(3, bool))


# ---------------------------------------------------------------- IJB template verification

@pytest.mark.parametrize("mode,score_key,json_key,auc_key", [
    ("insightface", "ijb_score_insightface_F2N1D1", "insightface_eval_ijbc_flip_add_norm_faceness", "auc_insightface"),
    ("tface", "ijb_score_tface_noflip_l2", "tface_IJB_Evaluation_noflip_l2norm", "auc_tface"),
])
def test_ijb(npz, summary, mode, score_key, json_key, auc_key):
    scores = ijb_scores(npz["ijb_img_feats"], npz["ijb_templates"], npz["ijb_medias"], npz["ijb_p1"], npz["ijb_p2"],
                        faceness=npz["ijb_faceness"], mode=mode)
    np.testing.assert_allclose(scores, npz[score_key], rtol=0, atol=1e-12)
    ref = summary["ijb_synthetic"]
    targets = tuple(row["fpr_target"] for row in ref[json_key])
    for s in (npz[score_key], scores):
        rows = tpr_at_fpr(npz["ijb_label"], s, targets)
        assert len(rows) == len(ref[json_key])
        for got, want in zip(rows, ref[json_key]):
            for k in ("fpr_target", "tpr", "fpr_selected", "threshold"):
                assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), (k, want["fpr_target"])
        fpr, tpr, _ = roc_curve(npz["ijb_label"], s)
        assert auc(fpr, tpr) == pytest.approx(ref[auc_key], abs=1e-12)


def test_default_fpr_targets_are_the_reference_ones(summary):
    for rows in (summary["ijb_synthetic"]["insightface_eval_ijbc_flip_add_norm_faceness"],
                 summary["ijb_synthetic"]["tface_IJB_Evaluation_noflip_l2norm"]):
        assert FPR_TARGETS == tuple(row["fpr_target"] for row in rows)


def test_roc_curve_small_case():
    fpr, tpr, thr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert np.isinf(thr[0])
    with pytest.raises(ValueError, match="genuine"):
        roc_curve(np.array([1, 1]), np.array([0.1, 0.2]))


# ---------------------------------------------------------------- TinyFace identification

def test_tinyface_ranks(npz, summary):
    ref = summary["tinyface_synthetic"]
    want = {p["rank"]: ref[key] for key, p in golden_keys(ref, "rank{rank}")}
    ranks = rank_accuracy(npz["tiny_feat_probe"], npz["tiny_labels_probe"], npz["tiny_feat_gallery"],
                          npz["tiny_labels_gallery"], ranks=tuple(sorted(want)))
    assert ranks == want


def test_default_ranks_are_the_reference_ones(summary):
    assert TINYFACE_RANKS == tuple(sorted(p["rank"] for _, p in golden_keys(summary["tinyface_synthetic"], "rank{rank}")))


def test_dir_far_open_set_toy():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([[True, False], [False, True], [False, False]])  # probe 2 has no mate
    dirs, fars, thr = dir_far(scores, labels, ranks=(1,), fars=(1.0,))
    assert dirs.tolist() == [1.0]
    dirs, fars, thr = dir_far(scores, labels, ranks=(1,), fars=(0.0,))
    assert thr[0] == pytest.approx(0.7 + 1e-5) and dirs.tolist() == [1.0] and fars.tolist() == [0.0]


# ---------------------------------------------------------------- embedding and the eval command

class _Tiny(nn.Module):
    def __init__(self, returns_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 6)
        self.returns_norm = returns_norm

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.returns_norm:
            n = out.norm(dim=1, keepdim=True)
            return out / n, n
        return out


def test_embed_normalisation_flip_and_bgr():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    model = _Tiny()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = ((x / 255) - 0.5) / 0.5
    with torch.no_grad():
        raw = model(x).double().numpy() + model(torch.flip(x, dims=[3])).double().numpy()
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(embed(model, images, batch_size=2), want, rtol=0, atol=1e-6)
    # AdaFace-style (x/|x|, |x|) outputs fuse the same way as raw embeddings
    np.testing.assert_allclose(embed(_Tiny(returns_norm=True), images, batch_size=3), want, rtol=0, atol=1e-6)
    with torch.no_grad():
        bgr = model(torch.flip(x, dims=[1])).double().numpy()
    np.testing.assert_allclose(embed(model, images, flip=False, bgr=True), bgr / np.linalg.norm(bgr, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        embed(model, images.astype(np.float32))


def test_embed_takes_read_only_arrays_without_a_torch_warning(monkeypatch):
    """Ray hands a worker read-only arrays (zero-copy from the object store); torch warns on every user's screen when
    one becomes a tensor (the quickstart's synthesis showed it), so embed copies those first."""
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    model = _Tiny()
    want = embed(model, images)
    images.setflags(write=False)
    seen, from_numpy = [], torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: seen.append(a.flags.writeable) or from_numpy(a))
    np.testing.assert_array_equal(embed(model, images), want)
    assert seen and all(seen)


def test_fit_images_for_112x96_models():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_images(images, (112, 96)), images[:, :, 8:104])  # ArcFace = face.evoLVe + 8 px
    assert fit_images(images, (112, 112)) is images
    assert fit_images(images, (56, 56)).shape == (2, 56, 56, 3)


def _write_set(path, n_pairs=20, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (2 * n_pairs, 112, 112, 3), dtype=np.uint8)
    write_bin(path, list(images), [i % 2 == 0 for i in range(n_pairs)])


def test_evaluate_bins_and_table(tmp_path):
    _write_set(tmp_path / "lfw.bin")
    _write_set(tmp_path / "agedb_30.bin", seed=1)
    assert [p.stem for p in find_bins([tmp_path])] == ["lfw", "agedb_30"]
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))
    res = evaluate_bins(model, [tmp_path], batch_size=16)
    assert set(res) == {"lfw", "agedb_30", "average"}
    assert res["lfw"]["pairs"] == 20
    assert res["average"]["accuracy"] == pytest.approx((res["lfw"]["accuracy"] + res["agedb_30"]["accuracy"]) / 2)
    table = format_table(res)
    lines = table.splitlines()
    assert lines[2].startswith("lfw") and lines[3].startswith("agedb_30") and lines[-1].startswith("average")
    assert f"{100 * res['lfw']['accuracy']:.3f}" in lines[2]
    with pytest.raises(FileNotFoundError, match="not found"):
        find_bins([tmp_path / "missing.bin"])


def test_eval_command_end_to_end(tmp_path, capsys):
    """A tiny random TinyFaR-C saved as a plain state dict, evaluated on a 20-pair .bin set."""
    _write_set(tmp_path / "lfw.bin")
    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(build_backbone("tinyfar_c").state_dict(), ckpt)
    assert main(["eval", "--backbone", "tinyfar_c", "--checkpoint", str(ckpt), "--bins", str(tmp_path / "lfw.bin"),
                 "--batch-size", "20"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("lfw"))
    acc = float(row.split()[2])
    # the command's figure is the library's on the same checkpoint and set
    model = build_backbone("tinyfar_c")
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    assert acc == pytest.approx(100 * evaluate_bins(model.eval(), [tmp_path / "lfw.bin"])["lfw"]["accuracy"], abs=1e-3)
    assert "average" in out

    # unknown name and mismatched checkpoint are clear errors, exit code 2
    assert main(["eval", "--backbone", "no_such_net", "--checkpoint", str(ckpt), "--bins", str(tmp_path)]) == 2
    assert "unknown backbone 'no_such_net'" in capsys.readouterr().err
    assert main(["eval", "--backbone", "tinyfar_b", "--checkpoint", str(ckpt), "--bins", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "tinyfar_b" not in out


def test_eval_command_on_a_synray_checkpoint(tmp_path, capsys):
    """A synray checkpoint names its own architecture: no --backbone needed; a plain state dict is refused clearly."""
    from synray.models.export import save_backbone

    _write_set(tmp_path / "lfw.bin")
    kw = {"layers": (1, 1, 1, 1), "widths": (8, 16, 16, 32), "embedding_dim": 32}
    save_backbone(tmp_path / "student.pt", "iresnet18", build_backbone("iresnet18", **kw), kw)
    assert main(["eval", "--checkpoint", str(tmp_path / "student.pt"), "--bins", str(tmp_path / "lfw.bin")]) == 0
    assert any(line.startswith("lfw") for line in capsys.readouterr().out.splitlines())
    torch.save(build_backbone("iresnet18", **kw).state_dict(), tmp_path / "plain.pth")
    assert main(["eval", "--checkpoint", str(tmp_path / "plain.pth"), "--bins", str(tmp_path / "lfw.bin")]) == 2
    assert "not a synray backbone checkpoint" in capsys.readouterr().err
