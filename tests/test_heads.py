"""Margin heads against the reference implementations' outputs (golden/heads_logits.pt)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synray.models.heads import (
    AdaFace, ArcFace, CosFace, ElasticCosFace, SynFaceArcMargin, SynFaceCosMargin,
    build_head, synface_mixup_loss,
)

torch.set_num_threads(1)

# Logits are scaled by s (64 or 30): compare at atol 1e-4 as spec §9 says; CE and gradients at 1e-5.
LOGIT_TOL = dict(rtol=1e-5, atol=1e-4)
TOL = dict(rtol=1e-5, atol=1e-5)

D, C = 16, 10


@pytest.fixture(scope="module")
def golden(reference):
    return torch.load(reference / "recognition" / "golden" / "heads_logits.pt", weights_only=True)


def _run(head, golden, key, grads=False, **extra):
    head.load_class_centres(golden["kernel_DxC"])
    emb = golden["embeddings"].clone().requires_grad_(True)
    logits = head(emb, golden["labels"], **extra)
    torch.testing.assert_close(logits, golden[key], **LOGIT_TOL)
    ce = F.cross_entropy(logits, golden["labels"])
    if f"{key}_ce" in golden:
        torch.testing.assert_close(ce, golden[f"{key}_ce"], **TOL)
    if grads:
        ce.backward()
        torch.testing.assert_close(emb.grad, golden[f"{key}_grad_emb"], **TOL)
        torch.testing.assert_close(head.kernel.grad, golden[f"{key}_grad_kernel_DxC"], **TOL)
    return head, logits


CASES = [
    # (golden key, head factory, check gradients)
    ("tface_arcface_s64_m0.5", lambda: ArcFace(D, C), True),
    ("tface_arcface_s64_m0.5_easy", lambda: ArcFace(D, C, easy_margin=True), False),
    ("tface_cosface_s64_m0.4", lambda: CosFace(D, C), True),
    ("insightface_combined_arcface_s64", lambda: ArcFace(D, C, mode="insightface"), True),
    ("insightface_combined_cosface_s64", lambda: build_head("cosface_insightface", D, C), True),
    ("insightface_combined_arcface_s64_filter0.2",
     lambda: ArcFace(D, C, mode="insightface", interclass_filtering_threshold=0.2), False),
    ("adaface_repo_arcface_s64_m0.5", lambda: ArcFace(D, C, mode="angular", eps=1e-4), False),
    ("adaface_repo_cosface_s64_m0.4", lambda: CosFace(D, C, eps=1e-4), False),
    ("elasticface_repo_arcface_s64_m0.5", lambda: ArcFace(D, C, mode="angular"), False),
    ("elasticface_repo_cosface_s64_m0.35", lambda: CosFace(D, C, m=0.35), False),
    ("cfsm_arcface_s64_m0.5", lambda: ArcFace(D, C, sin_eps=1e-6, centres_layout="CxD"), False),
    ("synface_arcmargin_s30_m0.5", lambda: SynFaceArcMargin(D, C), True),
    ("synface_cosmargin_s30_m0.4", lambda: SynFaceCosMargin(D, C), False),
]


@pytest.mark.parametrize("key,factory,grads", CASES, ids=[c[0] for c in CASES])
def test_head_logits_ce_and_grads(golden, key, factory, grads):
    _run(factory(), golden, key, grads=grads)


def test_insightface_margin_is_straight_through(golden):
    """The no-grad edit gives gradients different from TFace's differentiable ArcFace."""
    tface, insight = "tface_arcface_s64_m0.5", "insightface_combined_arcface_s64"
    assert not torch.allclose(golden[f"{tface}_grad_emb"], golden[f"{insight}_grad_emb"], atol=1e-3)
    _run(ArcFace(D, C, mode="insightface"), golden, insight, grads=True)
    # no th/mm fallback: sample 1 (target cos ~ -0.9996) differs between the two modes
    assert abs(float(golden[tface][1, 3] - golden[insight][1, 3])) > 1.0


@pytest.mark.parametrize("t_alpha", [1.0, 0.01])
def test_adaface_logits_and_ema_buffers(golden, t_alpha):
    key = f"adaface_m0.4_h0.333_s64_talpha{t_alpha}"
    head = AdaFace(D, C, t_alpha=t_alpha)
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0
    head, _ = _run(head, golden, key, grads=t_alpha == 0.01)
    torch.testing.assert_close(head.batch_mean, golden[f"adaface_talpha{t_alpha}_batch_mean_after"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.batch_std, golden[f"adaface_talpha{t_alpha}_batch_std_after"], rtol=1e-6, atol=1e-6)
    assert set(head.state_dict()) == {"kernel", "t", "batch_mean", "batch_std"}


def test_adaface_accepts_backbone_norms(golden):
    """AdaFace's own backbone returns (x/|x|, |x|); passing those equals passing raw embeddings."""
    emb = golden["embeddings"]
    norms = torch.norm(emb, 2, 1, True)
    head = AdaFace(D, C, t_alpha=0.01)
    head.load_class_centres(golden["kernel_DxC"])
    out = head(emb / norms, golden["labels"], norms=norms)
    torch.testing.assert_close(out, golden["adaface_m0.4_h0.333_s64_talpha0.01"], **LOGIT_TOL)


ELASTIC = [
    ("elastic_arc_m0.5_std0.05", "elastic_arc"),
    ("elastic_arc_plus_m0.5_std0.0175", "elastic_arc_plus"),
    ("elastic_cos_m0.35_std0.05", "elastic_cos"),
    ("elastic_cos_plus_m0.35_std0.02", "elastic_cos_plus"),
]


@pytest.mark.parametrize("key,name", ELASTIC, ids=[e[1] for e in ELASTIC])
def test_elasticface_injected_and_seeded_margins(golden, key, name):
    margins = golden[f"{key}_margins_drawn"]
    _run(build_head(name, D, C), golden, key, margins=margins)
    # same torch RNG call as the reference: seeding reproduces the draw itself
    head = build_head(name, D, C)
    head.load_class_centres(golden["kernel_DxC"])
    torch.manual_seed(1234)
    torch.testing.assert_close(head(golden["embeddings"], golden["labels"]), golden[key], **LOGIT_TOL)


def test_elastic_plus_uses_reference_assignment(golden):
    """Row i gets sorted_margins[order[i]] (the reference's gather), not the inverse permutation."""
    key = "elastic_cos_plus_m0.35_std0.02"
    drawn = golden[f"{key}_margins_drawn"]
    head = ElasticCosFace(D, C, m=0.35, std=0.02, plus=True)
    head.load_class_centres(golden["kernel_DxC"])
    labels = golden["labels"]
    target = head.cosine(golden["embeddings"])[torch.arange(8), labels]
    applied = target - head(golden["embeddings"], labels, margins=drawn)[torch.arange(8), labels] / 64
    order = torch.argsort(target, descending=True)
    sorted_m = torch.sort(drawn.view(-1)).values
    torch.testing.assert_close(applied, sorted_m[order], rtol=0, atol=1e-5)
    inverse = torch.empty_like(sorted_m)
    inverse[order] = sorted_m
    assert not torch.allclose(applied, inverse, atol=1e-4)


@pytest.mark.parametrize("lam", [1.0, 0.35])
def test_synface_identity_and_domain_mixup(golden, lam):
    head = SynFaceArcMargin(D, C)
    head.load_class_centres(golden["kernel_DxC"])
    out, loss = synface_mixup_loss(head, golden["embeddings"], golden["synface_mixup_syn_label"],
                                   golden["synface_mixup_real_label"], lam)
    torch.testing.assert_close(out, golden[f"synface_mixup_lam{lam}_output"], **LOGIT_TOL)
    torch.testing.assert_close(loss, golden[f"synface_mixup_lam{lam}_loss"], **TOL)


def test_class_centres_layout(golden):
    """insightface/SynFace checkpoints store [C, D]: loading the transpose gives the same head."""
    a, b = ArcFace(D, C), ArcFace(D, C)
    a.load_class_centres(golden["kernel_DxC"])
    b.load_class_centres(golden["kernel_DxC"].t().contiguous(), layout="CxD")
    assert torch.equal(a.kernel, b.kernel)
    with pytest.raises(ValueError, match="do not fit"):
        a.load_class_centres(golden["kernel_DxC"], layout="CxD")


def test_unlabelled_rows_get_no_margin(golden):
    labels = golden["labels"].clone()
    labels[0] = -1
    for head in (ArcFace(D, C), ArcFace(D, C, mode="insightface"), CosFace(D, C)):
        head.load_class_centres(golden["kernel_DxC"])
        out = head(golden["embeddings"], labels)
        torch.testing.assert_close(out[0], head.s * head.cosine(golden["embeddings"])[0], rtol=1e-5, atol=1e-4)


def test_build_head_and_input_errors():
    assert isinstance(build_head("arcface", 512, 100), ArcFace)
    assert build_head("arcface_insightface", 512, 100).mode == "insightface"
    assert build_head("elastic_arc_plus", 512, 100).std == 0.0175
    assert build_head("synface_arc", 512, 100).s == 30.0
    assert build_head("adaface", 512, 100, t_alpha=0.01).t_alpha == 0.01
    with pytest.raises(ValueError, match="unknown head 'sphereface'"):
        build_head("sphereface", 512, 100)
    with pytest.raises(ValueError, match="unknown ArcFace mode"):
        ArcFace(8, 4, mode="nope")
    head = CosFace(8, 4)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[B, 8\]"):
        head(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        head(torch.randn(2, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer class ids"):
        head(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
