"""Training maths without Ray: PartialFC vs full softmax, SynFace mixups, CFSM's style step, data, resume."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import golden_key, golden_keys

from synray.config.base import ConfigError, load_config
from synray.config.train import TrainConfig
from synray.io.images import encode_image
from synray.jobs import load_job
from synray.models.cfsm import CFSMGenerator
from synray.models.heads import SynFaceArcMargin, build_head, synface_mixup_loss
from synray.models.inputs import normalize_images
from synray.training.cfsm_aug import adversarial_styles, real_synth_indices
from synray.training.checkpointing import (
    CheckpointReader,
    TrainingMeta,
    assemble_centres,
)
from synray.training.data import (
    augment_decoded,
    decode_augment,
    labels_for,
    random_resized_crop,
    repeat_rows,
    rrc_params,
)
from synray.training.learner import Learner, TrainPlan, learning_rate
from synray.training.mixup import (
    SYNFACE_LAMBDAS,
    Target,
    mix_images,
    mixed_logits,
    sample_lambda,
    soft_cross_entropy,
    synface_targets,
)
from synray.training.partial_fc import ShardedClassifier, class_split, sample_centres

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


# --- PartialFC / class-centre sharding --------------------------------------------------------

# One rank of a 2-process gloo group: class-sharded loss and gradients, with DDP's averaging emulated.
_RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from synray.models.heads import build_head
    from synray.training.partial_fc import ShardedClassifier, class_split
    from synray.training.mixup import synface_targets
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    case = torch.load(out + ".in", weights_only=True)
    results = {}
    for name, kw in (("arcface", {"s": 64.0, "m": 0.5}), ("cosface", {"s": 64.0, "m": 0.4}),
                     ("arcface_insightface", {"s": 64.0, "m": 0.5})):
        for mixed in (False, True):
            start, count = class_split(case["C"], world, rank)
            head = build_head(name, case["D"], count, **kw)
            with torch.no_grad():
                head.kernel.copy_(case["kernel"][:, start:start + count])
            clf = ShardedClassifier(head, case["C"], start, 1.0, grad_scale=world)
            A = torch.nn.Parameter(case["A"].clone())
            rows = slice(rank * case["b"], (rank + 1) * case["b"])
            emb = case["x"][rows] @ A
            if mixed:
                t = synface_targets(case["a"][rows], case["wa"][rows], case["lb"][rows], case["r"][rows], 0.35)
            else:
                t = synface_targets(case["a"][rows])
            loss, pred = clf(emb, t)
            loss.backward()
            grad_a = A.grad.clone()
            dist.all_reduce(grad_a)
            grad_a /= world  # what DDP does with the backbone's gradients
            results[f"{name}/{int(mixed)}"] = {"loss": loss.detach(), "grad_A": grad_a, "grad_kernel": head.kernel.grad,
                                               "start": start, "pred": pred}
    torch.save(results, out)
    dist.destroy_process_group()
""")


def _full_softmax(case, name, kw, mixed):
    head = build_head(name, case["D"], case["C"], **kw)
    with torch.no_grad():
        head.kernel.copy_(case["kernel"])
    A = torch.nn.Parameter(case["A"].clone())
    emb = case["x"] @ A
    if mixed:
        targets = synface_targets(case["a"], case["wa"], case["lb"], case["r"], 0.35)
    else:
        targets = synface_targets(case["a"])
    logits = mixed_logits(head, emb, targets)
    loss = soft_cross_entropy(logits, targets)
    loss.backward()
    return loss.detach(), A.grad, head.kernel.grad, logits


def test_partial_fc_equals_full_softmax_at_rate_one(tmp_path):
    """Two gloo processes, 11 classes sharded 6/5: loss, backbone and centre gradients == one-device softmax."""
    g = torch.Generator().manual_seed(0)
    W, b, C, D = 2, 4, 11, 16
    case = {
        "C": C, "D": D, "b": b,
        "kernel": torch.randn(D, C, generator=g) * 0.5, "A": torch.randn(12, D, generator=g) * 0.3,
        "x": torch.randn(W * b, 12, generator=g),
        "a": torch.tensor([0, 3, 5, 10, 6, 2, 9, 7]), "wa": torch.tensor([1.0, 0.7, 0.5, 0.95, 0.3, 1.0, 0.6, 0.2]),
        "lb": torch.tensor([-1, 4, 8, 1, 10, -1, 0, 6]), "r": torch.tensor([7, 8, 9, 10, 7, 8, 9, 10]),
    }
    out = str(tmp_path / "rank")
    for r in range(W):
        torch.save(case, f"{out}{r}.in")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), str(W), str(tmp_path / "store"), f"{out}{r}"],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(W)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(f"{out}{r}", weights_only=True) for r in range(W)]
    for name, kw in (("arcface", {"s": 64.0, "m": 0.5}), ("cosface", {"s": 64.0, "m": 0.4}),
                     ("arcface_insightface", {"s": 64.0, "m": 0.5})):
        for mixed in (False, True):
            key = f"{name}/{int(mixed)}"
            loss, grad_a, grad_k, logits = _full_softmax(case, name, kw, mixed)
            for r in ranks:
                res = r[key]
                torch.testing.assert_close(res["loss"], loss, atol=1e-5, rtol=1e-5, msg=key)
                torch.testing.assert_close(res["grad_A"], grad_a, atol=1e-5, rtol=1e-4, msg=key)
                s = res["start"]
                torch.testing.assert_close(res["grad_kernel"], grad_k[:, s:s + res["grad_kernel"].shape[1]], atol=1e-6, rtol=1e-4, msg=key)
            # the centre slices tile the class space
            assert sum(r[key]["grad_kernel"].shape[1] for r in ranks) == C
            # prediction = global argmax of the plain cosine
            cos = F.normalize(case["x"] @ case["A"]) @ F.normalize(case["kernel"], dim=0)
            assert torch.equal(torch.cat([r[key]["pred"] for r in ranks]), cos.argmax(1))


def test_class_split_matches_insightface_rule():
    assert [class_split(11, 3, r) for r in range(3)] == [(0, 4), (4, 4), (8, 3)]
    assert [class_split(10, 2, r) for r in range(2)] == [(0, 5), (5, 5)]
    with pytest.raises(ValueError, match="cannot be sharded"):
        class_split(2, 3, 0)


def test_partial_fc_sampling_keeps_positives_and_uses_sampled_softmax():
    g = torch.Generator().manual_seed(1)
    idx = sample_centres(torch.tensor([3, 17, 3]), 20, 8, g)
    assert idx.numel() == 8 and {3, 17} <= set(idx.tolist()) and torch.equal(idx, idx.sort().values)
    assert sample_centres(torch.arange(10), 20, 4, g).tolist() == list(range(10))  # positives alone exceed it

    torch.manual_seed(0)
    C, D = 40, 8
    head = build_head("cosface", D, C, s=30.0, m=0.35)
    clf = ShardedClassifier(head, C, 0, sample_rate=0.25, seed=3)
    emb = torch.randn(6, D)
    labels = torch.tensor([1, 5, 5, 30, 39, 0])
    loss, _ = clf(emb, [Target(labels, torch.ones(6))])
    assert clf.num_sample == 10
    # the same draw by hand: the loss is CosFace CE over the sampled centres only
    g = torch.Generator().manual_seed(3 * 1_000_003)
    index = sample_centres(labels, C, 10, g)
    sub = build_head("cosface", D, 10, s=30.0, m=0.35)
    with torch.no_grad():
        sub.kernel.copy_(head.kernel[:, index])
    local = torch.searchsorted(index, labels)
    torch.testing.assert_close(loss, F.cross_entropy(sub(emb, local), local), atol=1e-5, rtol=1e-5)


# --- SynFace mixups -----------------------------------------------------------------------------


def test_synface_mixup_matches_golden(reference):
    """Every stored mixup lambda, with the ArcMarginProduct(s, m) classifier that the golden's meta names."""
    g = torch.load(reference / "recognition" / "golden" / "heads_logits.pt", weights_only=True)
    emb, kernel, syn, real = g["embeddings"], g["kernel_DxC"], g["synface_mixup_syn_label"], g["synface_mixup_real_label"]
    d, c = kernel.shape
    setting = re.search(r"s=(\d+(?:\.\d+)?),\s*m=(\d+(?:\.\d+)?)", json.loads(g["meta"])["synface_mixup"])
    head = SynFaceArcMargin(d, c, s=float(setting.group(1)), m=float(setting.group(2)))
    with torch.no_grad():
        head.kernel.copy_(kernel)
    for key, p in golden_keys(g, "synface_mixup_lam{lam}_output"):
        lam = p["lam"]
        targets = synface_targets(syn[:, 0].long(), syn[:, 1], syn[:, 2].long(), real, lam)
        logits = mixed_logits(head, emb, targets)
        loss = soft_cross_entropy(logits, targets)
        torch.testing.assert_close(logits, g[key], atol=1e-4, rtol=0)
        torch.testing.assert_close(loss, g[key.removesuffix("_output") + "_loss"], atol=1e-5, rtol=0)
        # the sharded classifier (one worker) computes the same loss
        clf = ShardedClassifier(head, c, 0)
        torch.testing.assert_close(clf(emb, targets)[0], loss, atol=1e-5, rtol=0)
        # and so does the heads module's reference transcription
        _, ref_loss = synface_mixup_loss(head, emb, syn, real, lam)
        torch.testing.assert_close(ref_loss, loss, atol=1e-5, rtol=0)


def test_synface_mixup_by_hand():
    """Two rows, three classes, a margin-free head: logits and loss written out explicitly."""
    cos = torch.tensor([[0.2, -0.1, 0.5], [0.0, 0.3, -0.4]])

    def head(_emb, labels):  # plain scaled cosine, CosFace-like margin 0.1 on the target
        out = cos.clone()
        rows = torch.where(labels >= 0)[0]
        out[rows, labels[rows]] -= 0.1
        return 10 * out

    a, wa, b, r, lam = torch.tensor([0, 1]), torch.tensor([0.8, 1.0]), torch.tensor([2, -1]), torch.tensor([1, 2]), 0.6
    t = synface_targets(a, wa, b, r, lam)
    assert [w for x in t for w in x.weights.tolist()] == pytest.approx([0.48, 0.6, 0.12, 0.0, 0.4, 0.4])
    logits = mixed_logits(head, None, t)
    expect = 10 * cos.clone()
    expect[0, 0] -= 10 * 0.1 * 0.48
    expect[0, 2] -= 10 * 0.1 * 0.12
    expect[0, 1] -= 10 * 0.1 * 0.4
    expect[1, 1] -= 10 * 0.1 * 0.6
    expect[1, 2] -= 10 * 0.1 * 0.4
    torch.testing.assert_close(logits, expect)
    logp = torch.log_softmax(expect, 1)
    loss = (-(0.48 * logp[0, 0] + 0.6 * logp[1, 1]) - (0.12 * logp[0, 2] + 0.0) - (0.4 * logp[0, 1] + 0.4 * logp[1, 2])) / 2
    torch.testing.assert_close(soft_cross_entropy(logits, t), loss)


def test_domain_mixup_inputs_and_lambda_grid():
    assert SYNFACE_LAMBDAS == tuple(round(0.05 * k, 3) for k in range(21))
    rng = np.random.default_rng(0)
    draws = [sample_lambda(rng) for _ in range(2000)]
    assert set(draws) == set(SYNFACE_LAMBDAS)
    xs, xr = torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), -1.0)
    torch.testing.assert_close(mix_images(xs, xr, 0.35), torch.full((2, 3, 4, 4), 0.35 - 0.65))
    with pytest.raises(ValueError, match="equal batches"):
        mix_images(xs, xr[:1], 0.5)
    with pytest.raises(ValueError, match="real labels"):
        synface_targets(torch.tensor([0]), lam=0.5)
    # every worker runs one collective per target: the count never depends on the values
    unmixed = synface_targets(torch.tensor([0, 1]), torch.ones(2), torch.tensor([-1, -1]), torch.tensor([5, 6]), 1.0)
    assert len(unmixed) == 3 and float(unmixed[1].weights.abs().sum() + unmixed[2].weights.abs().sum()) == 0.0


# --- CFSM ---------------------------------------------------------------------------------------


def test_cfsm_generator_defaults_are_the_published_manifest(reference):
    manifest = json.loads((reference / "recognition" / "manifests" / "cfsm_generator.json").read_text())
    sd = CFSMGenerator().state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["state_dict"]


def test_cfsm_signed_gradient_step():
    torch.manual_seed(0)
    gen = CFSMGenerator(dim=4, n_residual=1, latent_dim=16).eval().requires_grad_(False)
    fr = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 4, 0])

    def loss_fn(img):
        return F.cross_entropy(fr(img), y)

    o0 = torch.randn(6, 10)
    # the gradient by an independent graph
    o = o0.clone().requires_grad_(True)
    loss_fn(gen(x, o)[1]).backward()
    grad = o.grad
    fr.zero_grad(set_to_none=True)
    for alpha, eps in ((0.314, 0.314), (0.5, 0.2), (1e-3, 1.0)):
        styles, synth = adversarial_styles(gen, x, loss_fn, epsilon=eps, alpha=alpha, styles=o0)
        expect = torch.clamp(o0 + alpha * grad.sign(), o0 - eps, o0 + eps)
        torch.testing.assert_close(styles, expect)
        assert (styles - o0).abs().max() <= eps + 1e-6
        torch.testing.assert_close(synth, gen(x, styles)[1])
    # a small step raises the FR loss (first order: alpha * |grad|_1 > 0)
    with torch.no_grad():
        assert loss_fn(gen(x, styles)[1]) > loss_fn(gen(x, o0)[1])
    assert all(p.grad is None for p in fr.parameters())


def test_cfsm_real_synth_mix():
    g = torch.Generator().manual_seed(0)
    real, syn = real_synth_indices(256, 0.75, g)
    assert (real.numel(), syn.numel()) == (192, 64)
    assert len(set(real.tolist())) == 192 and len(set(syn.tolist())) == 64 and max(real.max(), syn.max()) < 256
    real, syn = real_synth_indices(10, 0.75, g)
    assert (real.numel(), syn.numel()) == (7, 2)


# --- data ---------------------------------------------------------------------------------------


def _png_batch(n=6, size=40):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return imgs, {
        "image": np.array([encode_image(im) for im in imgs], dtype=object),
        "identity": np.array([10, 12, 15, 10, 12, 15]), "identity_b": np.array([-1, 15, 10, -1, -1, 12]),
        "mix_weight": np.array([1.0, 0.7, 0.4, 1.0, 1.0, 0.55], np.float32),
    }


def test_decode_augment_shapes_and_labels():
    imgs, batch = _png_batch()
    ids = np.array([10, 12, 15])
    out = decode_augment(batch, image_size=(32, 32), ids=ids, offset=0, soft_labels=True,
                         augment={"flip": True, "rrc_prob": 0.2}, seed=0)
    assert out["image"].shape == (6, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["label"].tolist() == [0, 1, 2, 0, 1, 2]
    assert out["label_b"].tolist() == [-1, 2, 0, -1, -1, 1]
    assert out["weight_a"].tolist() == pytest.approx([1.0, 0.7, 0.4, 1.0, 1.0, 0.55])
    # no augmentation, same size: the decoded image itself (CHW)
    plain = decode_augment(batch, image_size=(40, 40), ids=ids, offset=100)
    assert np.array_equal(plain["image"][0], imgs[0].transpose(2, 0, 1))
    assert plain["label"].tolist() == [100, 101, 102, 100, 101, 102] and (plain["label_b"] == -1).all()
    # flip only: every image is the original or its mirror
    flipped = decode_augment(batch, image_size=(40, 40), ids=ids, augment={"flip": True, "rrc_prob": 0.0}, seed=1)
    kinds = [np.array_equal(o, im.transpose(2, 0, 1)) or np.array_equal(o, im[:, ::-1].transpose(2, 0, 1))
             for o, im in zip(flipped["image"], imgs)]
    assert all(kinds)
    with pytest.raises(ValueError, match="not among"):
        labels_for(np.array([11]), ids)
    # SynFace lists its few real images repeatedly: each copy is decoded and augmented on its own
    rep = repeat_rows(batch, 3)
    assert len(rep["image"]) == 18 and rep["identity"].tolist() == batch["identity"].tolist() * 3
    # decoded once and cached (data.cache_decoded), then augmented each epoch: the same rows as decoding each epoch
    aug = {"flip": True, "rrc_prob": 0.5}
    cached = augment_decoded(decode_augment(batch, image_size=(32, 32), ids=ids, soft_labels=True), augment=aug, seed=3)
    fresh = decode_augment(batch, image_size=(32, 32), ids=ids, soft_labels=True, augment=aug, seed=3)
    assert cached.keys() == fresh.keys() and all(np.array_equal(cached[k], fresh[k]) for k in fresh)
    assert not np.array_equal(cached["image"], decode_augment(batch, image_size=(32, 32), ids=ids)["image"])


def test_random_resized_crop_geometry():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = rrc_params(112, 112, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 112 - h and 0 <= left <= 112 - w
        assert 0.2 * 112 * 112 * 0.9 <= h * w <= 112 * 112
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(random_resized_crop(img, rng, (1.0, 1.0), (1.0, 1.0)), img)  # the whole image
    assert rrc_params(10, 100, (0.99, 1.0), (1.0, 1.0), np.random.default_rng(0)) == (0, 45, 10, 10)  # central fallback
    out = random_resized_crop(img, rng)
    assert out.shape == img.shape and out.dtype == np.uint8


# --- learner: steps, schedules, resume across worker counts --------------------------------------


def _tiny_cfg(tmp_path, **over) -> TrainConfig:
    data = {
        "name": "tiny", "data": {"train": str(tmp_path)}, "batch_size": 8, "epochs": 4,
        "backbone": {"name": "iresnet18", "kwargs": {"layers": [1, 1, 1, 1], "widths": [4, 8, 8, 16],
                                                      "embedding_dim": 16, "input_size": [16, 16]}},
        "head": {"name": "arcface", "kwargs": {"s": 16.0, "m": 0.2}},
        "schedule": {"name": "constant"}, "optimizer": {"lr": 0.05},
        "tracking": {"enabled": False},
    }
    for k, v in over.items():
        data[k] = v
    return TrainConfig.model_validate(data)


def _plan(num_syn=6, num_real=0):
    return TrainPlan(train_rows=64, num_syn_classes=num_syn, num_real_classes=num_real, real_rows=32,
                     image_size=(16, 16), embedding_size=16, config_hash="x")


def _batch(n, classes, gen, offset=0):
    return {"image": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen),
            "label": torch.randint(0, classes, (n,), generator=gen) + offset,
            "label_b": torch.randint(-1, classes, (n,), generator=gen) + offset * 0,
            "weight_a": torch.rand(n, generator=gen)}


def test_learner_steps_with_mixups_and_cfsm(tmp_path):
    gpath = tmp_path / "cfsm.pt"
    gkw = {"dim": 4, "n_residual": 1, "latent_dim": 16}
    torch.save({"G_state_dict": CFSMGenerator(**gkw).state_dict()}, gpath)
    gen = torch.Generator().manual_seed(0)
    # identity + domain mixup: the loss falls on a fixed batch
    cfg = _tiny_cfg(tmp_path, mixup={"identity": True, "domain": {"enabled": True, "real": str(tmp_path)}})
    learner = Learner(cfg, _plan(6, 3))
    batch, real = _batch(8, 6, gen), _batch(8, 3, gen, offset=6)
    batch["label_b"] = torch.where(batch["label_b"] == batch["label"], -1, batch["label_b"])
    first = learner.step(batch, 0, 0.05, real)
    losses = [learner.step(batch, 0, 0.05, real).loss for _ in range(6)]  # step 0: the same lam each time
    assert 0.0 <= first.lam <= 1.0 and losses[-1] < first.loss
    # CFSM: 75/25 mix of 8 rows -> 6 + 2 rows reach the classifier
    cfg = _tiny_cfg(tmp_path, cfsm={"enabled": True, "checkpoint": str(gpath), "generator": gkw})
    learner = Learner(cfg, _plan(6))
    seen = []  # every batch the backbone embeds: the style step's passes, then the training pass
    embed = learner._embed
    learner._embed = lambda module, x: (seen.append(x.detach().clone()), embed(module, x))[1]
    batch = _batch(8, 6, gen)
    res = learner.step(batch, 0, 0.05)
    assert res.rows == 8 and math.isfinite(res.loss)
    assert all(p.grad is None for p in learner.generator.parameters())
    inputs = normalize_images(learner.backbone_module, batch["image"].float())
    x = seen[-1]
    # 6 rows are input images as they are, 2 are restyled by the generator: none of them equals an input
    dist = torch.cdist(x.flatten(1), inputs.flatten(1)).min(dim=1).values
    assert x.shape[0] == 8 and (dist[:6] < 1e-5).all() and (dist[6:] > 1.0).all(), dist


def test_checkpoint_resumes_on_a_different_worker_count(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    plan = _plan(7)
    one = Learner(cfg, plan)
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        one.step(_batch(8, 7, gen), k, 0.05)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    one.write_checkpoint(str(ckpt), TrainingMeta(1, 3, 0, 7, 16, 1, "x"))
    reader = CheckpointReader.from_uri(str(ckpt))
    assert reader.names() == ["backbone.pt", "centres-0000000000-0000000007.pt", "meta.json", "trainer_state.pt"]
    # two workers: rank 1 owns classes 4..6 and gets their centres and momentum
    two = Learner(cfg, plan, rank=1, world_size=2)
    meta = two.restore(reader)
    assert (meta.epoch, meta.step, meta.world_size) == (1, 3, 1)
    torch.testing.assert_close(two.head.kernel, one.head.kernel[:, 4:])
    torch.testing.assert_close(two.opt_head.state[two.head.kernel]["momentum_buffer"],
                               one.opt_head.state[one.head.kernel]["momentum_buffer"][:, 4:])
    for a, b in zip(two.backbone_module.state_dict().values(), one.backbone_module.state_dict().values()):
        torch.testing.assert_close(a, b)
    # and the pieces of several ranks assemble back into any range
    k = torch.arange(20.0).view(2, 10)
    parts = [(0, 4, k[:, :4], {"momentum_buffer": -k[:, :4]}), (4, 10, k[:, 4:], {"momentum_buffer": -k[:, 4:]})]
    kernel, state = assemble_centres(parts, 2, 7)
    assert torch.equal(kernel, k[:, 2:7]) and torch.equal(state["momentum_buffer"], -k[:, 2:7])
    with pytest.raises(FileNotFoundError, match=r"\[4, 10\)"):
        assemble_centres(parts[:1], 0, 10)
    with pytest.raises(ValueError, match="classes"):
        Learner(cfg, _plan(9)).restore(reader)


LR_STEP = "tface_admis_epoch_lr_LRS{lrs}_STAGES{stages}_{epochs}ep"
LR_POLY_WARMUP = "insightface_PolynomialLRWarmup_base{base}_warm{warmup}_total{total}_power{power}"
LR_POLY = "cfsm_PolyScheduler_base{base}_warm{warmup}_max{max}_power{power}"


def _lr_schedules(reference) -> dict:
    path = reference / "recognition" / "golden" / "align_crop_resample_schedules.json"
    return json.loads(path.read_text())["lr_schedules"]


def _per_step(cfg: TrainConfig, total: int) -> list[float]:
    """The LR of each of ``total`` iterations, as ``cfg.epochs`` epochs of equal length."""
    steps_per_epoch = total // cfg.epochs
    assert steps_per_epoch * cfg.epochs == total
    return [learning_rate(cfg, k // steps_per_epoch, k % steps_per_epoch, k, steps_per_epoch) for k in range(total)]


def _train_config(**fields) -> TrainConfig:
    return TrainConfig.model_validate({"data": {"train": "x"}, **fields})


def test_learning_rates_match_reference_schedules(reference):
    """Configs set to each stored schedule's settings (read off its key) give its learning rates."""
    golden = _lr_schedules(reference)
    key, p = golden_key(golden, LR_STEP)
    step_cfg = _train_config(epochs=p["epochs"], optimizer={"lr": p["lrs"][0]},
                             schedule={"milestones": p["stages"], "lrs": p["lrs"]})
    assert [learning_rate(step_cfg, e, 0, e * 10, 10) for e in range(p["epochs"])] == golden[key]
    key, p = golden_key(golden, LR_POLY_WARMUP)
    epochs = math.gcd(p["total"], 10)  # 10 epochs of 10 iterations for the published 100
    poly = _train_config(epochs=epochs, optimizer={"lr": p["base"]},
                         schedule={"name": "poly_warmup", "warmup_steps": p["warmup"], "power": p["power"]})
    assert _per_step(poly, p["total"]) == golden[key][:p["total"]]
    key, p = golden_key(golden, LR_POLY)
    epochs = math.gcd(p["max"], 10)
    cfsm = _train_config(epochs=epochs, optimizer={"lr": p["base"]},
                         schedule={"name": "poly", "warmup_steps": p["warmup"], "power": p["power"]})
    assert _per_step(cfsm, p["max"]) == pytest.approx(golden[key][:p["max"]], abs=1e-15)


def test_default_schedules_are_the_reference_recipes(reference):
    """Unset lr, milestones, gamma and power default to TFace/ADMIS, insightface and CFSM's recipes."""
    golden = _lr_schedules(reference)
    key, p = golden_key(golden, LR_STEP)
    step_cfg = _train_config(epochs=p["epochs"])
    assert [learning_rate(step_cfg, e, 0, e * 10, 10) for e in range(p["epochs"])] == golden[key]
    key, p = golden_key(golden, LR_POLY_WARMUP)
    poly = _train_config(epochs=math.gcd(p["total"], 10), schedule={"name": "poly_warmup", "warmup_steps": p["warmup"]})
    assert _per_step(poly, p["total"]) == golden[key][:p["total"]]
    key, p = golden_key(golden, LR_POLY)
    cfsm = _train_config(epochs=math.gcd(p["max"], 10), schedule={"name": "poly", "warmup_steps": p["warmup"]})
    assert _per_step(cfsm, p["max"]) == pytest.approx(golden[key][:p["max"]], abs=1e-15)


# --- config ---------------------------------------------------------------------------------------


def test_train_configs_validate_and_reject_bad_values(tmp_path):
    for path in sorted((ROOT / "conf" / "train").glob("*.yaml")):
        cfg = load_job(path, kind="train")
        assert isinstance(cfg, TrainConfig)
    ir50 = load_job(ROOT / "conf" / "train" / "ir50_arcface.yaml")
    assert (ir50.batch_size, ir50.epochs, ir50.schedule.milestones, ir50.augment.rrc_prob) == (512, 40, [22, 28, 32], 0.2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\ndata: {train: x}\noptimiser: {lr: 1}\n")
    with pytest.raises(ConfigError, match="optimiser: unknown key"):
        load_job(bad)
    with pytest.raises(ConfigError, match="unknown backbone"):
        load_config(None, TrainConfig, ["data.train=x", "backbone.name=resnet9000"])
    with pytest.raises(ConfigError, match="unknown head"):
        load_config(None, TrainConfig, ["data.train=x", "head.name=softmaxx"])
    with pytest.raises(ConfigError, match="real"):
        load_config(None, TrainConfig, ["data.train=x", "mixup.domain.enabled=true"])
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, TrainConfig, ["data.train=x", "scaling.num_workers=[3, 2]"])
    with pytest.raises(ConfigError, match="scaling.resources.*GPU=1.0 must be a custom resource"):
        load_config(None, TrainConfig, ["data.train=x", "scaling.resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="scaling.resources.*gpu_node=0.0"):
        load_config(None, TrainConfig, ["data.train=x", "scaling.resources={gpu_node: 0}"])
    assert load_config(None, TrainConfig, ["data.train=x", "scaling.resources={gpu_node: 1}"]).scaling.resources == {"gpu_node": 1.0}
