"""Nothing executed, nothing leaked: restricted ``.bin`` unpickling, sweep-restore ownership, one redaction for
everything that leaves a process, credential-free pickles of S3 filesystems, fast "unreachable storage"."""

import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from synray.config import ConfigError, load_config
from synray.config.sweep import SweepConfig
from synray.config.synth import SynthConfig
from synray.evaluation.binset import BinSetError, read_bin, write_bin
from synray.io import storage
from synray.io.images import encode_image
from synray.redact import redact, redact_text

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# .bin verification sets


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20, 16, 3), dtype=np.uint8) for _ in range(n)]


def _py2_bin(blobs: list[bytes], labels: list[bytes]) -> bytes:
    """What Python 2 insightface wrote (``pickle.dump((bins, issame), f, 2)`` with ``str`` images).

    ``labels`` are pickled items, e.g. ``b"\\x88"`` (True) or a numpy bool scalar as Python 2 numpy wrote it.
    """
    out = bytearray(b"\x80\x02](")
    for b in blobs:
        out += b"T" + struct.pack("<I", len(b)) + b  # BINSTRING: a Python 2 str
    out += b"e]("
    for item in labels:
        out += item
    return bytes(out + b"e\x86.")


def _py2_numpy_bool(value: bool) -> bytes:
    """numpy.bool_ pickled by Python 2 numpy: ``scalar(dtype('b1', 0, 1) + state, '\\x01')`` with str codes."""
    dtype = (b"cnumpy\ndtype\n" + b"U\x02b1K\x00K\x01\x87R"
             + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return b"cnumpy.core.multiarray\nscalar\n" + dtype + b"U\x01" + (b"\x01" if value else b"\x00") + b"\x86R"


def test_genuine_bin_layouts_load(tmp_path):
    ims = _images(4)
    png = [encode_image(im, ".png") for im in ims]
    expected = np.stack(ims)
    layouts = {
        "written_by_synray": None,
        "py2_str_and_bools": _py2_bin(png, [b"\x88", b"\x89"]),
        "py2_numpy_bools": _py2_bin(png, [_py2_numpy_bool(True), _py2_numpy_bool(False)]),
    }
    write_bin(tmp_path / "written_by_synray.bin", ims, [True, False], fmt=".png")
    for name, raw in layouts.items():
        if raw is not None:
            (tmp_path / f"{name}.bin").write_bytes(raw)
    py3 = {
        "numpy_bools": (png, [np.bool_(True), np.bool_(False)]),
        "numpy_bool_array": (png, np.array([True, False])),
        "numpy_uint8_images": ([np.frombuffer(b, np.uint8) for b in png], [True, False]),
    }
    for name, blob in py3.items():
        for proto in (2, 5):  # protocol 2 spells bytes as _codecs.encode; 5 has numpy's _frombuffer
            (tmp_path / f"{name}_p{proto}.bin").write_bytes(pickle.dumps(blob, protocol=proto))
    paths = sorted(tmp_path.glob("*.bin"))
    assert len(paths) == 3 + 2 * len(py3)
    for path in paths:
        images, issame = read_bin(path, image_size=None)
        np.testing.assert_array_equal(images, expected, err_msg=path.name)
        assert issame.tolist() == [True, False], path.name


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("where", ["whole", "image", "label", "object_array", "codec"])
def test_crafted_bin_payload_is_refused_and_never_runs(where, tmp_path):
    marker = tmp_path / "payload-ran"
    png = [encode_image(im, ".png") for im in _images(2)]
    if where == "whole":
        blob = _System(marker)
    elif where == "image":
        blob = ([png[0], _System(marker)], [True])
    elif where == "label":
        blob = (png, [_Eval(marker)])
    elif where == "object_array":
        blob = (np.array([png[0], _System(marker)], dtype=object), [True])
    else:  # _codecs.encode is admitted for bytes, but with no codec other than latin-1
        blob = (png, [True])
    path = tmp_path / f"{where}.bin"
    raw = pickle.dumps(blob, protocol=2)
    if where == "codec":
        raw = raw.replace(b"latin1", b"base64", 1)
        assert b"base64" in raw
    path.write_bytes(raw)
    with pytest.raises(BinSetError, match=f"{path}.*not an insightface .bin"):
        read_bin(path)
    assert not marker.exists()


def test_bin_with_wrong_layout_is_a_clear_error(tmp_path):
    png = [encode_image(im, ".png") for im in _images(2)]
    cases = {"not_a_pair": (png,), "numbers_as_labels": (png, [1]), "text_images": (["a", "b"], [True]),
             "dict": {"images": png}}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(blob))
        with pytest.raises(BinSetError, match=f"{path} is not an insightface .bin"):
            read_bin(path)


def test_torch_lower_bound_closes_the_weights_only_bypass():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch.specifier.contains(Version("2.5.1")) and torch.specifier.contains(Version("2.6.0"))


# --------------------------------------------------------------------------------------------
# redaction

SECRETS = ["Us3r/1nfo@Secret:x", "Us3r", "5ec7e75196a7", "FwoGZXSessionTok", "AKIACREDENTIAL00001", "TokSecret123",
           "SigSecret456", "wJalrXUtnFEMI", "hunter2", "AKIAUSERINFOKEY00001"]
USERINFO = "s3://AKIAUSERINFOKEY00001:Us3r/1nfo@Secret:x@bucket/ctx.npy"
PRESIGNED = ("https://b.s3.amazonaws.com/u.ckpt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIACREDENTIAL00001%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Signature=5ec7e75196a7&X-Amz-Security-Token=FwoGZXSessionTok%2F%2F&X-Amz-Expires=60")
TOKEN_URL = "https://host/x.pt?token=TokSecret123&sig=SigSecret456&page=2"
SECRET_OVERRIDES = [f"contexts.path={USERINFO}", f"generator.unet={PRESIGNED}", f"tracking.run_name={TOKEN_URL}",
                    "generator.vq_config={aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, "
                    "db_password: hunter2}"]


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_redact_text_covers_every_shape():
    cases = {
        USERINFO: "s3://***@bucket/ctx.npy",
        "https://u:p@ss:w/rd@mlflow:5000/api?a=1": "https://***@mlflow:5000/api?a=1",
        TOKEN_URL: "https://host/x.pt?token=***&sig=***&page=2",
        "override 'tracking.db_password=hunter2' is bad": "override 'tracking.db_password=***' is bad",
        "{'aws_secret_access_key': 'wJalrXUtnFEMI/K7', 'lr': 0.1}": "{'aws_secret_access_key': '***', 'lr': 0.1}",
        '{"api_token": 12345, "n": 2}': '{"api_token": ***, "n": 2}',
        "creds AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY end": "creds AKIAIOSFODNN7EXAMPLE:*** end",
        "plain s3://bucket/x and http://host:5000/p?page=2": "plain s3://bucket/x and http://host:5000/p?page=2",
    }
    for text, want in cases.items():
        assert redact_text(text) == want
    out = redact_text(PRESIGNED)
    assert not _leaks(out) and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out and "X-Amz-Expires=60" in out
    nested = redact({"credentials": {"user": "me", "port": 5}, "uris": [USERINFO], "lr": 0.1, "api_key": None})
    assert nested == {"credentials": {"user": "***", "port": "***"}, "uris": ["s3://***@bucket/ctx.npy"], "lr": 0.1,
                      "api_key": None}


def test_config_errors_do_not_echo_secrets(capsys):
    from synray.cli import main

    bad = [["identities.count=s3://AKIAUSERINFOKEY00001:Us3r/1nfo@Secret:x@b"],  # a value echoed by pydantic
           ["tracking.db_password=[hunter2"],  # a YAML parse error quotes the value
           [f"contexts.path=[{USERINFO}"],
           [f"identities.count={PRESIGNED}"], [f"identities.count={TOKEN_URL}"]]
    for over in bad:
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "conf/synth/world.yaml", SynthConfig, over)
        assert not _leaks(str(err.value)) and not _leaks(repr(err.value.__cause__)), str(err.value)
        assert main(["config", str(ROOT / "conf/synth/world.yaml"), "--set", over[0]]) == 2
    out = capsys.readouterr()
    assert "identities.count" in out.err and not _leaks(out.err + out.out)
    err = storage.StorageError(f"cannot write {USERINFO}: denied")
    assert not _leaks(str(err)) and "s3://***@bucket/ctx.npy" in str(err)


def _scan(root: Path) -> dict[str, list[str]]:
    """Every file under ``root`` (MLflow's SQLite store included) that holds a secret."""
    hits = {}
    for path in root.rglob("*"):
        if path.is_file():
            found = [s for s in SECRETS if s.encode() in path.read_bytes()]
            if found:
                hits[str(path.relative_to(root))] = found
    return hits


def test_a_job_leaks_no_secret_to_files_mlflow_or_stdout(tmp_path, capsys, monkeypatch):
    from synray.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    rc = main(["synth", str(ROOT / "conf/synth/world.yaml"), "--local", "--quiet", "--set", f"output.uri={tmp_path}/out",
               "--set", "identities.count=2", "--set", "identities.unit_size=2", "--set", "generator.images_per_identity=2",
               "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=t-secrets",
               *[a for o in SECRET_OVERRIDES for a in ("--set", o)]])
    assert rc == 0
    saved = (tmp_path / "out" / "_config.yaml").read_text()
    assert "s3://***@bucket/ctx.npy" in saved and "db_password: '***'" in saved
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t-secrets").experiment_id])
    assert run.data.params["contexts.path"] == "s3://***@bucket/ctx.npy"
    assert run.data.params["generator.vq_config.db_password"] == "***"
    logged = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert "X-Amz-Signature=***" in logged
    out = capsys.readouterr()
    assert '"images_written": 4' in out.out and not _leaks(out.out + out.err)
    assert not _leaks(json.dumps([run.data.params, run.data.tags, run.info.run_name]))
    assert _scan(tmp_path) == {}  # config.yaml, manifest, the SQLite store, artifacts


def test_tracker_redacts_params_tags_text_and_text_artifacts(tmp_path, monkeypatch):
    from synray.tracking import Tracker, ensure_experiment, mlflow_ui_hint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    exp = ensure_experiment(uri, "t-tracker")
    notes = tmp_path / "notes.txt"
    notes.write_text(f"fetched {PRESIGNED}\nsecret_key={'hunter2'}\n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\xff binary s3://k:v@b")  # not text: uploaded byte for byte
    with mlflow.start_run(experiment_id=exp) as run:
        tr = Tracker(run)
        tr.log_params({"store.password": "hunter2", "uri": USERINFO, "lr": 0.1})
        tr.set_tags({"source": TOKEN_URL})
        tr.log_text(f"best from {USERINFO}", "best.txt")
        tr.log_artifact(str(notes))
        tr.log_artifact(str(binary))
    client = mlflow.MlflowClient(uri)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"store.password": "***", "uri": "s3://***@bucket/ctx.npy", "lr": "0.1"}
    assert got.data.tags["source"] == "https://host/x.pt?token=***&sig=***&page=2"
    binary.unlink()
    notes.unlink()
    assert _scan(tmp_path) == {}
    texts = [Path(client.download_artifacts(run.info.run_id, n, str(tmp_path / "dl"))).read_text()
             for n in ("best.txt", "notes.txt")]
    assert texts[0] == "best from s3://***@bucket/ctx.npy" and "secret_key=***" in texts[1]
    assert Path(client.download_artifacts(run.info.run_id, "blob.bin", str(tmp_path / "dl"))).read_bytes() == \
        b"\x00\xff binary s3://k:v@b"
    hint = mlflow_ui_hint("https://synray:Us3r/1nfo@Secret:x@mlflow.example:5000")
    assert hint == "MLflow runs: open https://***@mlflow.example:5000"


def _sweep_cfg(tmp_path, *extra: str) -> SweepConfig:
    return load_config(ROOT / "conf/sweep/world_distill_tiny.yaml", SweepConfig, [
        f"base={ROOT / 'conf/distill/world_tiny.yaml'}", f"output.uri={tmp_path}/sweeps",
        f"overrides=[epochs=2, teacher={tmp_path}/teacher.pt]", *extra])


def test_sweep_best_config_and_parent_run_file_hold_no_secret(tmp_path, mlflow_server):
    from synray.tuning.sweep import (
        PARENT_FILE,
        best_config_yaml,
        load_target,
        tracking_run,
    )

    port = mlflow_server.rsplit(":", 1)[1]
    tracking = f"http://synray:hunter2%2FUs3r@127.0.0.1:{port}"  # basic-auth userinfo (the server ignores it)
    cfg = _sweep_cfg(tmp_path, f"tracking.uri={tracking}", "tracking.experiment=t-sweep-secrets",
                     f"overrides=[epochs=2, 'teacher={USERINFO}', 'tracking.run_name={PRESIGNED}']")
    base = load_target(cfg)
    best = best_config_yaml(base, {"resampling_coef": 2.0}, "distill")
    assert "resampling_coef: 2.0" in best and "teacher: s3://***@bucket/ctx.npy" in best and not _leaks(best)
    exp_uri = str(tmp_path / "sweeps" / cfg.name)
    with tracking_run(cfg) as tracker:
        assert tracker.run_id
    parent = json.loads((Path(exp_uri) / PARENT_FILE).read_text())
    assert parent == {"run_id": tracker.run_id, "tracking_uri": f"http://***@127.0.0.1:{port}"}
    run = mlflow.MlflowClient(mlflow_server).get_run(tracker.run_id)
    assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{port}" and "hunter2" not in json.dumps(run.data.params)


# --------------------------------------------------------------------------------------------
# sweep restore ownership


def test_sweep_identity_follows_the_experiment_not_run_settings(tmp_path):
    from synray.tuning.sweep import load_target, sweep_identity

    cfg = _sweep_cfg(tmp_path)
    ident = sweep_identity(cfg, load_target(cfg))
    same = _sweep_cfg(tmp_path, "resume=false", "trial_max_failures=3", "tracking.experiment=other")
    assert sweep_identity(same, load_target(same)) == ident
    for change in ("space={resampling_coef: {grid: [0.0, 1.0]}}", "metric=val/loss", "name=other",
                   f"overrides=[epochs=3, teacher={tmp_path}/teacher.pt]"):
        other = _sweep_cfg(tmp_path, change)
        assert sweep_identity(other, load_target(other)) != ident, change


class _TouchOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_sweep_refuses_to_restore_a_foreign_experiment(tmp_path):
    from synray.tuning.sweep import (
        OWNER_FILE,
        check,
        check_owner_marker,
        load_target,
        sweep_identity,
        write_owner_marker,
    )

    cfg = _sweep_cfg(tmp_path)
    exp = tmp_path / "sweeps" / cfg.name
    exp.mkdir(parents=True)
    ran = tmp_path / "payload-ran"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_TouchOnLoad(ran)))  # what Tuner.restore would unpickle
    with pytest.raises(ConfigError, match=f"refusing to restore sweep 'world_distill_coef'.*no {OWNER_FILE}"):
        check(cfg)
    assert not ran.exists()

    other = _sweep_cfg(tmp_path, "space={resampling_coef: {grid: [0.0, 1.0]}}")
    write_owner_marker(str(exp), sweep_identity(other, load_target(other)))  # made by another sweep config
    with pytest.raises(ConfigError, match=r"has config_hash .* \(a different sweep or config\)"):
        check(cfg)
    assert not ran.exists()
    (exp / OWNER_FILE).write_text("[]")
    with pytest.raises(ConfigError, match="unreadable"):
        check_owner_marker(str(exp), sweep_identity(cfg, load_target(cfg)))

    ident = sweep_identity(cfg, load_target(cfg))
    mine = write_owner_marker(str(exp), ident)
    assert check_owner_marker(str(exp), ident) == mine and len(mine["id"]) == 32
    again = write_owner_marker(str(exp), ident)
    assert again["id"] != mine["id"]  # a new experiment in the same folder is another run


# --------------------------------------------------------------------------------------------
# credentials never travel in pickles; S3 still works

FAKE = {"AWS_ACCESS_KEY_ID": "AKIASYNRAYPICKLE0001", "AWS_SECRET_ACCESS_KEY": "synray/Pickle+Secret/0123456789abcdefABCD",
        "AWS_SESSION_TOKEN": "SynrayPickleSessionTokenValue"}


def test_pickled_s3_objects_carry_no_credentials(monkeypatch):
    import ray.cloudpickle

    from synray.io.s3 import BotoUploadHandler, run_storage

    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    storage._s3_filesystem.cache_clear()
    try:
        loc = storage.resolve("s3://bucket/prefix/x")
        _, train_fs = run_storage("s3://bucket/prefix")
        objects = {"location": loc, "filesystem": loc.fs, "ray_train_storage": train_fs, "handler": BotoUploadHandler(loc.fs)}
        for name, obj in objects.items():
            for dumps in (pickle.dumps, ray.cloudpickle.dumps):
                blob = dumps(obj)
                assert not [k for k, v in FAKE.items() if v.encode() in blob], name
        restored = pickle.loads(pickle.dumps(loc))
        assert restored.fs.region == "eu-west-3" and restored.path == "bucket/prefix/x"  # endpoint/region still travel
    finally:
        storage._s3_filesystem.cache_clear()


READ_IN_ANOTHER_PROCESS = """
import pickle, sys
loc, train_fs, out_path = pickle.loads(sys.stdin.buffer.read())
with train_fs.open_output_stream(out_path) as fh:  # BotoUploadHandler: a boto3 upload with this process's chain
    fh.write(b"written by the worker")
with loc.fs.open_input_stream(loc.path) as fh:
    sys.stdout.write(fh.read().decode())
"""


def test_s3_io_with_credentials_from_each_process_chain(s3_server):
    from synray.io.s3 import run_storage

    storage._s3_filesystem.cache_clear()
    base = f"s3://{s3_server['bucket']}/security-{time.time_ns()}"
    storage.check_writable(base)
    storage.write_bytes_atomic(storage.join(base, "a.txt"), b"hello from the driver")
    assert storage.read_bytes(storage.join(base, "a.txt")) == b"hello from the driver"
    assert storage.exists(storage.join(base, "a.txt")) and storage.listdir(base) == ["a.txt"]
    loc = storage.resolve(storage.join(base, "a.txt"))
    path, train_fs = run_storage(base)
    payload = pickle.dumps((loc, train_fs, f"{path}/b.txt"))
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"].encode() not in payload
    proc = subprocess.run([sys.executable, "-c", READ_IN_ANOTHER_PROCESS], input=payload, capture_output=True,
                          env={**os.environ, **s3_server["env"]}, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == b"hello from the driver"
    assert storage.read_bytes(storage.join(base, "b.txt")) == b"written by the worker"


# --------------------------------------------------------------------------------------------
# unreachable storage fails fast


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aws_env(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)


def test_closed_port_is_reported_as_unreachable_storage(monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    _aws_env(monkeypatch, endpoint)
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match=f"unreachable storage: {endpoint} did not answer for s3://nowhere/x"):
        storage.check_writable("s3://nowhere/x")
    assert time.perf_counter() - t0 < 10


def test_silent_endpoint_is_reported_within_the_probe_timeouts(monkeypatch):
    # accepts connections (the kernel completes them) but never answers: boto's defaults wait 60 s per attempt
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
        _aws_env(monkeypatch, endpoint)
        monkeypatch.setattr(storage, "PROBE_CONNECT_TIMEOUT_S", 1.0)
        monkeypatch.setattr(storage, "PROBE_READ_TIMEOUT_S", 1.0)
        t0 = time.perf_counter()
        with pytest.raises(storage.StorageError, match="unreachable storage"):
            storage.check_writable("s3://silent/x")
        assert time.perf_counter() - t0 < 15


def test_output_overwrite_is_not_a_key():
    with pytest.raises(ConfigError, match="output.overwrite: unknown key"):
        load_config(None, SynthConfig, ["output.overwrite=true"])
