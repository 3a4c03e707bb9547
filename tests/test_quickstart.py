"""The README's main job at CI size: world -> teacher -> LDM -> synthetic shards -> students -> table."""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from synray.config import ConfigError, load_config
from synray.config.quickstart import QuickstartConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "conf" / "quickstart.yaml"


def test_quickstart_config_validates_and_tiny_applies():
    from synray.quickstart import TINY

    cfg = load_config(QUICKSTART, QuickstartConfig, TINY)
    assert cfg.world.train_identities == 48 and cfg.ldm_steps == 100
    with pytest.raises(ConfigError, match="world.train_identity: unknown key"):
        load_config(QUICKSTART, QuickstartConfig, ["world.train_identity=3"])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("overrides, want", [
    ([], [4]),  # the shipped build: 8 epochs, the drop after 4, as before the rule
    (["teacher_epochs=16"], [8]),  # the tiny build (was after 4: three quarters at the low rate)
    (["teacher_epochs=16", 'teacher.overrides=["epochs=8", "schedule.milestones=[3]"]'], [3]),  # a recipe's own wins
])
def test_the_teachers_learning_rate_drops_after_half_its_epochs(monkeypatch, tmp_path, overrides, want):
    """``build_assets`` trains the teacher with its one learning-rate drop after half of ``teacher_epochs``: the
    tiny build's teacher then cleared pixel matching by +7.5 to +9.8 points (5 builds) against +1.2 to +8.8 (9)."""
    import synray.quickstart as qs

    jobs = []

    def first_job(job):
        jobs.append(job)
        raise _Stop

    monkeypatch.setattr(qs, "run_job", first_job)
    cfg = load_config(QUICKSTART, QuickstartConfig, [f"output={tmp_path}", *overrides])
    with pytest.raises(_Stop):
        qs.build_assets(cfg, str(tmp_path / "real"), str(tmp_path / "bins"), str(tmp_path / "assets"), [])
    teacher = jobs[0]
    assert teacher.name == "teacher" and teacher.epochs == cfg.teacher_epochs
    assert teacher.schedule.name == "step" and teacher.schedule.milestones == want


SHIPPED_FILES = ("teacher.pt", "unet.ckpt", "vq_decoder.pt")
TINY_RECORD = os.path.join(os.path.dirname(__file__), "data", "quickstart_tiny_assets.json")
STUDY_TINY_RECORD = os.path.join(os.path.dirname(__file__), "data", "study_tiny_assets.json")


def _tensors(path: str) -> dict:
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob.get("state_dict", blob)


def test_shipped_assets_load_strictly_and_say_how_they_were_made(tmp_path):
    from synray.models.export import load_any_backbone
    from synray.models.ldm_checkpoint import load_unet, load_vq_decoder
    from synray.models.vq import VQConfig
    from synray.quickstart import has_assets, load_assets, packaged_assets

    folder = packaged_assets()
    assert has_assets(folder), f"no shipped world assets in {folder}"
    assets = load_assets(folder)
    meta, gen = assets["meta"], assets["generator"]
    assert meta["made_by"].startswith("synray quickstart --rebuild-assets")
    for name in SHIPPED_FILES:  # "a few MB each"
        assert os.path.getsize(os.path.join(folder, name)) < 8 * 2**20, name
    teacher = load_any_backbone(assets["teacher"])
    assert teacher.input_size == (32, 32)
    unet = load_unet(gen["unet"])  # strict, weights_only
    assert unet.context_emb.in_features == meta["context_dim"]
    load_vq_decoder(gen["vq_decoder"], VQConfig.from_dict(gen["vq_config"]))
    # the shipped teacher learnt the world: its recorded verification on the held-out sets is well above that of
    # its architecture at random initialisation on the same sets (remade here from the recorded world), which
    # already matches world faces by their pixels (seen: 92.9 / 66.4% against 83.6 / 57.2%)
    from synray.quickstart import untrained_student, write_world_bins

    bins = write_world_bins(meta["world"], str(tmp_path / "bins"))
    floor = untrained_student(load_config(QUICKSTART, QuickstartConfig).teacher, str(tmp_path / "bins"))
    assert set(bins) == set(floor) - {"average"}
    for name, v in meta["teacher_verification"].items():
        assert v["accuracy"] >= floor[name]["accuracy"] + 0.05, (name, v["accuracy"], floor[name]["accuracy"])


def fresh_clone(dest: Path) -> Path:
    """The repository's tracked files copied to ``dest``: what a user has after ``git clone``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src, dst = ROOT / name.decode(), dest / name.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


def synray(cwd: Path, *args: str, timeout: float = 1100) -> str:
    """The ``synray`` console command in a subprocess, as a user types it in ``cwd``."""
    out = subprocess.run(["synray", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.commands
@pytest.mark.beside
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_quickstart_end_to_end(tmp_path):
    """The README's main job as typed (``synray quickstart``, at ``--tiny`` size) from the root of a fresh clone, with
    the config's default relative output and tracking store, the shipped world teacher and LDM, plus ``--distill``
    (DigiFace DCGAN in the loop, dlib teacher) when those offline assets are installed."""
    distill = all(importlib.util.find_spec(m) for m in ("dlib", "gan_face_generate", "face_recognition_models"))
    clone = fresh_clone(tmp_path / "synray")
    out = synray(clone, "quickstart", "--tiny", *(["--distill"] if distill else []))
    qs = clone / "outputs" / "quickstart"  # conf/quickstart.yaml's relative output, against the working dir
    assert "synthetic (LDM)" in out and "real (baseline)" in out and "mlflow ui" in out
    assert not (qs / "assets-build").exists()  # nothing rebuilt: the shipped assets were used
    result = json.loads((qs / "results.json").read_text())
    assert result["images_generated"] == 48 * 16
    acc = {k: {s: v["accuracy"] for s, v in result[k].items()} for k in ("untrained", "real", "synthetic")}
    # the floor: the student's architecture at its random initialisation, on the same sets (it matches world faces
    # by their pixels: seen 86.3 / 60.7%), the same network as the recipe's at its seed
    from synray.quickstart import TINY, untrained_student

    cfg = load_config(QUICKSTART, QuickstartConfig, TINY)
    floor = untrained_student(cfg.student, str(qs / "bins"))
    assert acc["untrained"] == pytest.approx({k: v["accuracy"] for k, v in floor.items()}, abs=0.005)
    assert "untrained (random init)" in out
    # At this size no student is claimed to beat that floor: seen real 87.7-88.0% frontal, 71.0-74.3% average,
    # synthetic 76.0-78.3% / 68.0-69.2%, against 86.3% / 73.5% untrained (the README's table at default size: the real
    # student clears it, the synthetic one does not). Learning is asserted where it is measurable: the held-out
    # verification test of training and the study's claims.
    assert all(set(a) == {"world-frontal", "world-hard", "average"} for a in acc.values()), acc
    if distill:
        assert "distilled (DCGAN + dlib)" in out
        m = result["distill"]["metrics"]
        assert m["val/cos"] > m["val/cos_initial"], m  # the student moved towards dlib's embeddings
        # at this size it has learnt little more than their mean (README): verified and reported, not claimed
        assert {"world-frontal", "world-hard", "average"} <= set(result["distill"]["verification"])
    import mlflow

    store = f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}"  # the default store, under the working dir
    assert f"mlflow ui --backend-store-uri {store}" in out
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["synray-quickstart"], output_format="list")
    top = [r for r in runs if r.data.tags.get("synray.job") == "quickstart"]
    assert top and top[0].data.metrics["synthetic/average"] == pytest.approx(acc["synthetic"]["average"])
    client = mlflow.MlflowClient()
    arts = {a.path for a in client.list_artifacts(top[0].info.run_id)}
    assert {"results.txt", "_samples.png", "roc"} <= arts
    # the sample grid (identities x samples of the synthetic set), and ROC curves of the students per verification set
    roc = {a.path for a in client.list_artifacts(top[0].info.run_id, "roc")}
    assert roc == {"roc/roc_world-frontal.png", "roc/roc_world-hard.png", "roc/thresholds.txt"}
    local = client.download_artifacts(top[0].info.run_id, "roc/thresholds.txt", str(tmp_path))
    text = open(local).read()
    students = ["real (baseline)", "synthetic (LDM)"] + (["distilled (DCGAN + dlib)"] if distill else [])
    assert all(f"world-hard / {label}" in text for label in students), text
    grid = client.download_artifacts(top[0].info.run_id, "_samples.png", str(tmp_path))
    from synray.io.images import decode_image
    from synray.io.sources import open_source

    size = min(112, decode_image(bytes(open_source(str(qs / "synthetic")).read_rows([0])["image"][0])).shape[0])
    assert decode_image(open(grid, "rb").read()).shape[:2] == (8 * (size + 2) - 2, 8 * (size + 2) - 2)


@pytest.mark.commands
@pytest.mark.beside
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_world_assets_rebuild_within_tolerance_from_another_directory(tmp_path):
    """The documented rebuild, at tiny size, typed in an empty directory outside the clone as one command
    (``synray study --rebuild-assets --assets-only`` into an empty folder: the quickstart's own build runs first,
    the same quickstart job ``synray quickstart --rebuild-assets --assets-only`` runs, then the study's extras, in
    one Ray session). The project's recipe is found, the relative output and tracking store land in that directory
    (the teacher's verification runs in Ray Train workers, which change directory, on the bins under it), and the
    build regenerates the recorded tiny builds: same files and architecture as the shipped checkpoints, the same
    generator settings, and a teacher and LDMs that reach the recorded accuracy and losses within tolerance.
    (Ray Data feeds Train workers in completion order, so weights are not bit-identical from run to run.)"""
    from synray.quickstart import packaged_assets

    record = json.loads(open(TINY_RECORD).read())
    work, dest = tmp_path / "elsewhere", tmp_path / "assets"
    work.mkdir()
    out = synray(work, "study", "--tiny", "--rebuild-assets", "--assets-only", "--set", f"assets={dest}", timeout=2200)
    # the quickstart's build ran first (its figures printed), then the study's extras
    assert "teacher world-frontal" in out and "nuisance regressor held-out R^2" in out
    assert set(os.listdir(work)) == {"outputs", "mlruns"} and (work / "mlruns" / "mlflow.db").exists()
    build = work / "outputs" / "study" / "assets-build"  # the nested quickstart job's output
    assert (build / "bins").is_dir()
    assert not (work / "outputs" / "study" / "data").exists()  # --assets-only stops after the build
    meta = json.loads((dest / "generator.json").read_text())
    assert meta["world"] == record["world"] and meta["context_dim"] == record["context_dim"]
    assert meta["generator"] == record["generator"]
    for name in SHIPPED_FILES:
        built, shipped = _tensors(str(dest / name)), _tensors(os.path.join(packaged_assets(), name))
        assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in shipped.items()}, name
    # the rebuilt teacher learnt the world: above its architecture at random initialisation on the same sets (which
    # matches world faces by their pixels: 86.3 / 60.7%), and near the recorded build (seen: the record's note); the
    # LDM's loss at its last step equal to the record's (seen: equal to 4 digits on every build)
    from synray.quickstart import untrained_student

    teacher = load_config(QUICKSTART, QuickstartConfig).teacher
    floor = untrained_student(teacher, str(build / "bins"))
    got = {k: v["accuracy"] for k, v in meta["teacher_verification"].items()}
    # seen (7 builds): average +4.3 to +9.8 points, world-frontal +8.0 to +10.0 (the record's note; with the learning
    # rate dropped after 4 of 16 epochs, before, one CI build cleared the average by +1.2)
    assert got["average"] >= floor["average"]["accuracy"] + 0.04, (got, floor)
    assert got["world-frontal"] >= floor["world-frontal"]["accuracy"] + 0.05, (got, floor)
    # world-hard (300 pairs) is the loose one: 60.0 to 70.3% over 7 builds, so it and the average get wider bounds
    tolerance = {"world-frontal": 0.06, "world-hard": 0.12, "average": 0.07}
    for name, ref in record["teacher_verification"].items():
        assert abs(got[name] - ref["accuracy"]) <= tolerance[name], (name, got, ref["accuracy"])
    got, ref = meta["ldm_metrics"]["loss"], record["ldm_metrics"]["loss"]
    assert meta["ldm_metrics"]["step"] == record["ldm_metrics"]["step"]
    assert abs(got - ref) <= 0.1 * ref, (got, ref)

    # the study's extras on top of them: CPD 0 and UIFace LDMs by the same train-ldm recipe, the nuisance
    # regressor, the CFSM model; compared with the recorded build (seen: LDM losses and the regressor's R^2 equal to
    # 6 digits, CFSM as below)
    from synray.study.assets import EXTRA_LDMS, ldm_files, load_study_assets

    study_record = json.loads(open(STUDY_TINY_RECORD).read())
    built = load_study_assets(str(dest))
    assert built.world == record["world"] and built.meta["world"] == study_record["world"]
    for name in EXTRA_LDMS:
        for file in ldm_files(name):  # the same architectures as the shipped study LDMs
            got, shipped = _tensors(str(dest / file)), _tensors(os.path.join(packaged_assets(), file))
            assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in shipped.items()}, file
        m, ref = built.meta["ldms"][name]["metrics"], study_record["ldms"][name]["metrics"]
        assert m["step"] == ref["step"] and abs(m["loss"] - ref["loss"]) <= 0.15 * ref["loss"], (name, m, ref)
    for factor, ref in study_record["nuisance"]["heldout_r2"].items():
        got = built.meta["nuisance"]["heldout_r2"][factor]
        assert abs(got - ref) <= 0.1, (factor, got, ref)
    assert built.meta["cfsm"]["generator"] == study_record["cfsm"]["generator"]
    # CFSM learns its identity objective (the identity distance matched to the style's size): its loss over the last
    # quarter of the fit well below the first quarter's. Not compared with the record: the fit learns through the
    # rebuilt teacher, which differs from build to build, and its 60 steps then end far apart (seen, last / first
    # quarter: identity 0.038 / 0.277 and 0.289 / 0.740 with two rebuilt teachers; pixel 0.38 / 0.46 and 0.55 / 0.49).
    losses = built.meta["cfsm"]["losses"]
    assert losses["identity"] < 0.7 * losses["first/identity"], losses
    assert built.training_centroids.shape == (record["world"]["train_identities"], record["context_dim"])
