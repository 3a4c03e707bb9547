"""SynthDistill: latent generators, teachers, the two-step loop with resampling, resume, and a run on Ray Train.

The mini-world run is unconditional: its teacher is a small FR model trained on world identities
(``fit_world_teacher``), its generator the world renderer driven by continuous latents. The real
offline pair (DigiFace DCGAN + dlib ResNet) runs when those packages are installed.
"""

import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import StopAfter

from synray.config import ConfigError, load_config
from synray.config.distill import DistillConfig
from synray.distill.generators import (
    GeneratorError,
    StyleGAN2Generator,
    WorldLatentGenerator,
    face_crops,
    load_stylegan2,
)
from synray.distill.loop import Distiller, check, distill_loop
from synray.distill.resample import crop_and_resize
from synray.distill.teachers import BackboneTeacher, TeacherError, load_teacher
from synray.models.inputs import model_input
from synray.training.runner import local_hooks

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"name": "iresnet18", "kwargs": {"layers": [1, 1, 1, 1], "widths": [8, 16, 16, 32], "embedding_dim": 32,
                                           "input_size": [32, 32]}}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def world_cfg(teacher, **over) -> DistillConfig:
    data = {"generator": {"type": "world"}, "teacher": str(teacher), "student": STUDENT, "crop_size": 32,
            "batch_size": 16, "iterations_per_epoch": 6, "epochs": 2, "seed": 0,
            "validation": {"batches": 2, "batch_size": 32}, "optimizer": {"lr": 3e-3}, "tracking": {"enabled": False}}
    for k, v in over.items():
        data[k] = v
    return DistillConfig.model_validate(data)


# --- generators and crops -------------------------------------------------------------------------

def test_world_latent_generator_is_deterministic_and_smooth(world_teacher):
    g = WorldLatentGenerator(seed=0, size=64, difficulty=0.5)
    z = torch.randn(6, g.z_dim, generator=torch.Generator().manual_seed(1))
    a, b = g.synthesize(g.map(z)), g.synthesize(g.map(z.clone()))
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    near = g.synthesize(g.map(z + 0.2 * torch.randn(z.shape, generator=torch.Generator().manual_seed(2))))
    far = g.synthesize(g.map(torch.randn(z.shape, generator=torch.Generator().manual_seed(3))))
    teacher = load_teacher(str(world_teacher))
    e = [torch.nn.functional.normalize(teacher(face_crops(x, "resize", 32))) for x in (a, near, far)]
    cos_near, cos_far = (e[0] * e[1]).sum(1).mean(), (e[0] * e[2]).sum(1).mean()
    assert cos_near > cos_far + 0.2, (cos_near, cos_far)  # a small latent step keeps the identity
    with pytest.raises(GeneratorError, match=r"\[B, 46\]"):
        g.map(torch.zeros(2, 5))


def test_face_crops_follow_synthdistill():
    x = torch.rand(2, 3, 256, 256)
    assert torch.equal(face_crops(x, "ffhq", 112), crop_and_resize(x))
    assert face_crops(x, "resize", 56).shape == (2, 3, 56, 56)
    with pytest.raises(ValueError, match="crop mode"):
        face_crops(x, "centre", 112)


FAKE_NVLABS = '''
import torch
from torch import nn

class TinyG(nn.Module):
    """Stands in for NVlabs' Generator: mapping(z, c, truncation_psi) -> ws, synthesis(ws) -> [-1, 1] images."""
    def __init__(self):
        super().__init__()
        self.z_dim, self.w_dim, self.c_dim, self.num_ws, self.img_resolution = 8, 8, 0, 3, 64
        self.mapping = Mapping()
        self.synthesis = Synthesis()

class Mapping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.num_ws = 3
    def forward(self, z, c, truncation_psi=1.0):
        return (self.fc(z) * truncation_psi).unsqueeze(1).repeat(1, self.num_ws, 1)

class Synthesis(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3 * 64 * 64)
    def forward(self, ws):
        return torch.tanh(self.fc(ws[:, 0])).reshape(-1, 3, 64, 64)
'''


def test_stylegan2_pickle_needs_nvlabs_code_and_loads_with_it(tmp_path, monkeypatch, world_teacher):
    with pytest.raises(GeneratorError, match="dnnlib"):
        load_stylegan2(tmp_path / "missing.pkl")
    pkg = tmp_path / "nvlabs"
    (pkg / "torch_utils").mkdir(parents=True)
    (pkg / "dnnlib").mkdir()
    (pkg / "torch_utils" / "__init__.py").write_text(textwrap.dedent(FAKE_NVLABS))
    (pkg / "dnnlib" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(pkg))
    import torch_utils  # noqa: F401 - the module the pickle references

    torch.manual_seed(0)
    with open(tmp_path / "g.pkl", "wb") as fh:
        pickle.dump({"G_ema": torch_utils.TinyG(), "G": None}, fh)
    monkeypatch.delitem(sys.modules, "torch_utils")  # loading must import it again from the path
    g = StyleGAN2Generator(load_stylegan2(tmp_path / "g.pkl"), truncation_psi=0.7)
    w = g.map(torch.randn(4, 8))
    assert w.shape == (4, 3, 8) and g.crop == "ffhq"
    img = g.synthesize(w)
    assert img.shape == (4, 3, 64, 64) and float(img.min()) >= 0 and float(img.max()) <= 1
    with pytest.raises(GeneratorError, match="no 'G_ema'"):
        with open(tmp_path / "bad.pkl", "wb") as fh:
            pickle.dump({"D": 1}, fh)
        load_stylegan2(tmp_path / "bad.pkl")
    # the two-step iteration runs on it: latents are resampled in W and broadcast to every layer
    cfg = world_cfg(world_teacher, generator={"type": "stylegan2", "path": str(tmp_path / "g.pkl")}, batch_size=4)
    d = Distiller(cfg, generator=g)
    seen = []
    synth = g.synthesize
    g.synthesize = lambda w, generator=None: (seen.append(w.clone()), synth(w))[1]
    d.iteration(0, 0)
    w1, w2 = seen
    assert torch.equal(w2[:, 0], w2[:, 2]) and not torch.equal(w1, w2)


def test_resampling_coefficient_zero_keeps_the_latents(world_teacher):
    cfg = world_cfg(world_teacher, resampling_coef=0.0, batch_size=4)
    d = Distiller(cfg)
    seen = []
    synth = d.generator.synthesize
    d.generator.synthesize = lambda w, generator=None: (seen.append(w.clone()), synth(w))[1]
    out = d.iteration(0, 0)
    assert torch.equal(seen[0], seen[1]) and np.isfinite(out["loss_resampled"])
    # the same iteration on 2 "workers" sees exactly the rows of the 1-worker batch
    halves = [Distiller(cfg, rank=r, world_size=2, teacher=d.teacher, generator=d.generator).latents(0, 0, 0)
              for r in (0, 1)]
    assert torch.equal(torch.cat(halves), d.latents(0, 0, 0))


# --- teachers and config checks ---------------------------------------------------------------

def test_teacher_specs_and_dimension_errors(tmp_path, world_teacher):
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(str(tmp_path / "nope.pt"))
    t = load_teacher(str(world_teacher))
    assert isinstance(t, BackboneTeacher) and t.embedding_dim == 32
    assert t(torch.rand(3, 3, 112, 112)).shape == (3, 32)  # crops of any size reach the model's input_size
    with pytest.raises(TeacherError, match=r"\[B, 3, H, W\]"):
        t(torch.rand(3, 112, 112))
    x = model_input(t.model, torch.ones(1, 3, 32, 32))
    assert torch.allclose(x, torch.ones_like(x))  # (255 - 127.5) / 127.5
    bad = world_cfg(world_teacher, student={"name": "iresnet18", "kwargs": {**STUDENT["kwargs"], "embedding_dim": 64}})
    with pytest.raises(ValueError, match="student.kwargs.embedding_dim: .*64-d.*32-d"):
        check(bad)
    with pytest.raises(ConfigError, match="generator.path is required"):
        load_config(None, DistillConfig, ["generator.type=stylegan2", "generator.path=null"])
    with pytest.raises(ConfigError, match="divisible by scaling.num_workers"):
        load_config(None, DistillConfig, ["batch_size=15", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="unknown backbone"):
        load_config(None, DistillConfig, ["student.name=resnet9000"])


def test_job_entry_point_rejects_bad_configs_before_ray(capsys, tmp_path, world_teacher):
    from synray.cli import job_main

    conf = str(ROOT / "conf/distill/world_tiny.yaml")
    assert job_main("distill", ["--config", conf, "--set", "batch_size=15"]) == 2
    assert "divisible by scaling.num_workers" in capsys.readouterr().err
    assert job_main("distill", ["--config", conf, "--set", f"teacher={tmp_path}/none.pt"]) == 2
    assert "none.pt" in capsys.readouterr().err
    bad = ["--set", f"teacher={world_teacher}", "--set", "student.kwargs.embedding_dim=16"]
    assert job_main("distill", ["--config", conf, *bad]) == 2
    assert "student.kwargs.embedding_dim" in capsys.readouterr().err
    assert job_main("distill", ["--config", str(ROOT / "conf/ldm/world_tiny.yaml")]) == 2
    assert "this command takes kind 'distill'" in capsys.readouterr().err


# --- the loop: cosine rises, checkpoints resume ---------------------------------------------------

def test_local_loop_learns_and_resumes(tmp_path, world_teacher):
    cfg = world_cfg(world_teacher, epochs=3)
    saved, reports = {}, []

    def report(metrics, directory):
        reports.append(metrics)
        if directory:
            dst = tmp_path / f"ck{metrics['epoch']}"
            dst.mkdir()
            for f in os.listdir(directory):
                (dst / f).write_bytes(Path(directory, f).read_bytes())
            saved[metrics["epoch"]] = dst

    with pytest.raises(RuntimeError, match="stopped after epoch 1"):
        distill_loop(cfg, local_hooks(send=report, callbacks=[StopAfter("epoch", 1, cfg.epochs)]))
    final = distill_loop(cfg, local_hooks(str(saved[1]), send=report))
    assert [m["epoch"] for m in reports] == [1, 2, 3] and final["resumed_from_epoch"] == 1
    assert final["val/cos"] > final["val/cos_initial"] + 0.15, final
    assert reports[0]["val/cos_initial"] == final["val/cos_initial"]  # kept across the resume
    from synray.models.export import load_any_backbone

    student = load_any_backbone(str(saved[3] / "student.pt"))
    assert student.embedding_dim == 32


@pytest.mark.ray
def test_distill_on_ray_train_two_workers(ray_session, world_teacher, tmp_path):
    """``synray distill`` on the mini world: 2 DDP workers, held-out verification, MLflow."""
    import mlflow

    from synray.io import storage
    from synray.jobs import load_job, run_job
    from synray.models.export import load_any_backbone
    from synray.world.world import World

    bins = World(seed=0, num_identities=48, difficulty=0.5).write_verification_bins(tmp_path / "bins", num_pairs=60)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_job(load_job(ROOT / "conf/distill/world_tiny.yaml", [
        f"teacher={world_teacher}", f"output.uri={tmp_path}/out",
        f"tracking.uri={uri}", "tracking.experiment=t-distill", f"eval.bins=[{bins['world-frontal']}]",
        "iterations_per_epoch=6"]), quiet=True)
    m = out.metrics
    assert m["epoch"] == 3 and m["world_size"] == 2 and m["step"] == 3 * 6 * 2
    assert m["val/cos"] > m["val/cos_initial"] + 0.2, m  # the student moves towards the teacher's embedding
    # at 36 steps it is still short of the best constant embedding (the teacher's mean direction), which the
    # job reports beside it; beating it is the study's SynthDistill claim, at the study's size
    assert "val/cos_constant" in m and "world-frontal" in out.table
    # yet it verifies held-out identities far above a constant embedding, which is at chance (0.5: every pair has
    # the same cosine); seen here: 98.3%
    assert m["val/world-frontal/accuracy"] >= 0.75, m
    assert load_any_backbone(out.model_uri).embedding_dim == 32
    summary = json.loads(storage.read_bytes(storage.join(out.output_uri, "final", "summary.json")))
    assert summary["model_uri"] == out.model_uri
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["t-distill"])
    assert len(runs) == 1 and runs.loc[0, "params.resampling_coef"] == "1.0"
    hist = mlflow.MlflowClient(uri).get_metric_history(runs.loc[0, "run_id"], "val/cos")
    assert len(hist) == 3 and hist[-1].value > hist[0].value - 0.05


def test_dcgan_with_dlib_teacher_cosine_rises():
    """The real offline pair: DigiFace DCGAN in the loop, dlib's ResNet as the teacher."""
    pytest.importorskip("gan_face_generate")
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    cfg = DistillConfig.model_validate({
        "generator": {"type": "dcgan"}, "teacher": "dlib", "crop_size": 56, "batch_size": 8, "seed": 0,
        "student": {"name": "tinyfar_c", "kwargs": {"embedding_dim": 128, "width_multiplier": 0.25,
                                                    "depth_multiplier": 0.3, "num_features": 128,
                                                    "input_size": [56, 56]}},
        "iterations_per_epoch": 5, "epochs": 1, "validation": {"batches": 1, "batch_size": 8},
        "optimizer": {"lr": 3e-3}, "tracking": {"enabled": False}})
    final = distill_loop(cfg, local_hooks())
    assert final["val/cos"] > final["val/cos_initial"] + 0.2, final
