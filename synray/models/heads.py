"""Margin heads (ArcFace, CosFace, AdaFace, ElasticFace, SynFace) as plain modules.

Every head takes the backbone's **raw** embeddings ``[B, D]`` and integer labels ``[B]`` and returns
the logits ``[B, C]`` after margin and scale; the loss is ordinary cross-entropy on them (except
SynFace's mixup combination, :func:`synface_mixup_loss`). A head owns its class centres as
``kernel`` of shape ``[D, C]`` (the TFace / AdaFace / ElasticFace layout). insightface PartialFC
(``weight``) and SynFace (``weight`` of ``ArcMarginProduct``/``CosMarginProduct``) store the
transpose ``[C, D]``: load those with :meth:`MarginHead.load_class_centres` (``layout="CxD"``).

Where the reference implementations disagree we keep each behaviour as a named mode, because the
differences change training, not just rounding:

* ``ArcFace(mode="tface")``: cos(θ+m) written as t·cos m − sinθ·sin m with the ``th``/``mm``
  fallback (t − m·sin m when θ+m would pass π), differentiated through (TFace, SynFace, CFSM with
  ``sin_eps=1e-6``).
* ``ArcFace(mode="insightface")``: insightface ``CombinedMarginLoss`` (1, m, 0). The angle edit is
  made under ``no_grad`` in place, so the gradient is straight-through (∂L/∂cos = s·(p − y)), and
  there is no fallback: θ+m may pass π. Optional inter-class filtering zeroes non-target cosines
  above a threshold.
* ``ArcFace(mode="angular")``: differentiable arccos → +m → cos (ElasticFace's plain ArcFace; with
  ``eps=1e-4`` the cosine is clamped to ±(1−eps) and θ+m to [eps, π−eps] as in AdaFace's repo).

Labels of ``-1`` mark rows without a target class (PartialFC shards); they get no margin.

All heads stay in one module: they share :class:`MarginHead` (centres, layouts, cosine), the label
conventions and the one registry :data:`HEADS` that configs name them by.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MarginHead", "ArcFace", "CosFace", "AdaFace", "ElasticArcFace", "ElasticCosFace",
    "SynFaceArcMargin", "SynFaceCosMargin", "synface_mixup_loss", "build_head", "register_head", "HEADS",
]


def l2_normalize(x: Tensor, dim: int) -> Tensor:
    """``x / ||x||`` along ``dim`` (the references' ``l2_norm``; no epsilon)."""
    return torch.div(x, torch.norm(x, 2, dim, True))


class MarginHead(nn.Module):
    """Base class: class-centre kernel ``[D, C]``, input checks and the normalised cosine."""

    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float, centres_layout: str = "DxC") -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        if centres_layout not in ("DxC", "CxD"):
            raise ValueError(f"centres_layout must be 'DxC' or 'CxD', got {centres_layout!r}")
        self.centres_layout = centres_layout
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.s = float(s)
        self.m = float(m)
        self.kernel = nn.Parameter(torch.empty(self.embedding_size, self.num_classes))
        nn.init.normal_(self.kernel, std=0.01)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m={self.m}"

    @torch.no_grad()
    def load_class_centres(self, weight: Tensor, layout: str = "DxC") -> None:
        """Copy class centres in; ``layout="CxD"`` for insightface PartialFC / SynFace ``weight``."""
        if layout not in ("DxC", "CxD"):
            raise ValueError(f"layout must be 'DxC' or 'CxD', got {layout!r}")
        w = weight.t() if layout == "CxD" else weight
        if tuple(w.shape) != tuple(self.kernel.shape):
            raise ValueError(
                f"class centres of shape {tuple(weight.shape)} ({layout}) do not fit a head with "
                f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"
            )
        self.kernel.copy_(w)

    def check(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape [B, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must have shape [{embeddings.shape[0]}], got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.max()) >= self.num_classes or int(labels.min()) < -1):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) (or -1 for no target), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )

    def raw_cosine(self, embeddings: Tensor) -> Tensor:
        """Cosine between normalised embeddings and class centres (not clamped).

        ``centres_layout`` only picks the matrix product the reference used: ``x̂ @ K̂`` on [D, C]
        (TFace family) or ``linear(x̂, Ŵ)`` on a contiguous [C, D] copy (insightface, SynFace,
        CFSM). They differ by float rounding alone, which matters where arccos is steep (cos ≈ ±1).
        """
        if self.centres_layout == "CxD":
            return F.linear(F.normalize(embeddings), F.normalize(self.kernel.t().contiguous()))
        return torch.mm(l2_normalize(embeddings, 1), l2_normalize(self.kernel, 0))

    def cosine(self, embeddings: Tensor) -> Tensor:
        """:meth:`raw_cosine` clamped to [-1, 1]."""
        return self.raw_cosine(embeddings).clamp(-1, 1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Row indices with a target class and those targets (rows labelled -1 are skipped)."""
    rows = torch.where(labels != -1)[0]
    return rows, labels[rows]


class ArcFace(MarginHead):
    """Additive angular margin cos(θ_y + m); see the module docstring for the three modes."""

    MODES = ("tface", "insightface", "angular")

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        mode: str = "tface",
        easy_margin: bool = False,
        sin_eps: float = 0.0,
        interclass_filtering_threshold: float = 0.0,
        eps: float = 0.0,
        centres_layout: str | None = None,
    ) -> None:
        layout = centres_layout or ("CxD" if mode == "insightface" else "DxC")
        super().__init__(embedding_size, num_classes, s, m, layout)
        if mode not in self.MODES:
            raise ValueError(f"unknown ArcFace mode {mode!r}; choose one of {self.MODES}")
        self.mode = mode
        self.easy_margin = bool(easy_margin)
        self.sin_eps = float(sin_eps)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.eps = float(eps)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check(embeddings, labels)
        if self.mode == "tface":
            return self._tface(embeddings, labels)
        if self.mode == "insightface":
            return self._insightface(embeddings, labels)
        return self._angular(embeddings, labels)

    def _tface(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(embeddings)
        rows, cols = _targets(labels)
        t = cos[rows, cols].view(-1, 1)
        sin = torch.sqrt(1.0 + self.sin_eps - torch.pow(t, 2))
        phi = t * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            phi = torch.where(t > 0, phi, t)
        else:
            phi = torch.where(t > self.th, phi, t - self.mm)
        cos = cos.index_put((rows, cols), phi.view(-1))
        return cos * self.s

    def _insightface(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        logits = self.cosine(embeddings)
        rows, cols = _targets(labels)
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = (logits > self.interclass_filtering_threshold).float()
                dirty[rows, cols] = 0.0
                keep = 1 - dirty
            logits = keep * logits
        # In-place edit without autograd: forward uses cos(θ+m), backward sees the identity.
        with torch.no_grad():
            target = logits[rows, cols].arccos_()
            logits.arccos_()
            logits[rows, cols] = target + self.m
            logits.cos_()
        return logits * self.s

    def _angular(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(embeddings)
        if self.eps > 0:
            cos = cos.clamp(-1 + self.eps, 1 - self.eps)
        rows, cols = _targets(labels)
        m_hot = torch.zeros_like(cos)
        m_hot[rows, cols] = self.m
        theta = cos.acos() + m_hot
        if self.eps > 0:
            theta = torch.clip(theta, min=self.eps, max=math.pi - self.eps)
        return theta.cos() * self.s


class CosFace(MarginHead):
    """Additive cosine margin: target logit cos θ_y − m, all ×s (TFace, insightface, ElasticFace).

    ``eps > 0`` clamps the cosine to ±(1 − eps) first, as AdaFace's repository does.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4, eps: float = 0.0,
                 centres_layout: str = "DxC") -> None:
        super().__init__(embedding_size, num_classes, s, m, centres_layout)
        self.eps = float(eps)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check(embeddings, labels)
        cos = self.cosine(embeddings)
        if self.eps > 0:
            cos = cos.clamp(-1 + self.eps, 1 - self.eps)
        rows, cols = _targets(labels)
        cos = cos.index_put((rows, cols), cos[rows, cols] - self.m)
        return cos * self.s


class AdaFace(MarginHead):
    """AdaFace: margin adapted to the feature norm, a proxy of image quality (AdaFace ``head.py``).

    The norm is standardised with EMA buffers ``batch_mean``/``batch_std`` (updated with
    ``t_alpha`` *before* use, on every call as in the reference), ``ẑ = clip(h·(n−μ)/(σ+eps), ±1)``;
    the target angle moves by −m·ẑ and the target cosine by −(m + m·ẑ). The class keeps the reference
    head's own default ``t_alpha=1.0``; ``build_head("adaface")`` uses the AdaFace training recipe's
    ``0.01`` (``config.py``), which is what training means by AdaFace.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 1.0,
    ) -> None:
        super().__init__(embedding_size, num_classes, s, m)
        self.h = float(h)
        self.t_alpha = float(t_alpha)
        self.eps = 1e-3
        with torch.no_grad():
            self.kernel.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, embeddings: Tensor, labels: Tensor, norms: Tensor | None = None) -> Tensor:
        """``embeddings`` raw; or, with ``norms`` ([B, 1]), already normalised backbone output."""
        self.check(embeddings, labels)
        if norms is None:
            norms = torch.norm(embeddings, 2, 1, True)
            embeddings = torch.div(embeddings, norms)
        elif norms.shape != (embeddings.shape[0], 1):
            raise ValueError(f"norms must have shape [{embeddings.shape[0]}, 1], got {tuple(norms.shape)}")
        cos = torch.mm(embeddings, l2_normalize(self.kernel, 0)).clamp(-1 + self.eps, 1 - self.eps)
        safe = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean, std = safe.mean(), safe.std()
            self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
            self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)
        scaler = (safe - self.batch_mean) / (self.batch_std + self.eps)
        scaler = torch.clip(scaler * self.h, -1, 1)
        rows, cols = _targets(labels)
        one_hot = torch.zeros_like(cos)
        one_hot[rows, cols] = 1.0
        theta = torch.clip(cos.acos() + one_hot * (self.m * scaler * -1), min=self.eps, max=math.pi - self.eps)
        cos = theta.cos() - one_hot * (self.m + self.m * scaler)
        return cos * self.s


class _Elastic(MarginHead):
    """Per-sample margins m_i ~ N(m, std²) drawn each call (not clipped); ``plus`` sorts them."""

    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float, std: float, plus: bool) -> None:
        super().__init__(embedding_size, num_classes, s, m)
        self.std = float(std)
        self.plus = bool(plus)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", std={self.std}, plus={self.plus}"

    def margins(self, cos: Tensor, rows: Tensor, cols: Tensor, margins: Tensor | None) -> Tensor:
        """The margin applied to each target row ([R, 1]); ``margins`` injects the raw draw.

        "Plus" reproduces the reference exactly: the draw is sorted ascending and row i receives
        ``sorted[order[i]]`` where ``order`` ranks the target cosines in descending order.
        """
        n = rows.shape[0]
        if margins is None:
            margins = torch.normal(mean=self.m, std=self.std, size=(n, 1), device=cos.device)
        else:
            margins = margins.to(cos.device, cos.dtype).reshape(-1, 1)
            if margins.shape[0] != n:
                raise ValueError(f"injected margins must have {n} entries (one per labelled row), got {margins.shape[0]}")
        if self.plus:
            with torch.no_grad():
                _, order = torch.sort(cos[rows, cols].detach().clone(), dim=0, descending=True)
                margins, _ = torch.sort(margins, dim=0)
                margins = margins[order]
        return margins

    def margin_grid(self, cos: Tensor, labels: Tensor, margins: Tensor | None) -> Tensor:
        """[B, C] zeros with each labelled row's margin at its target class."""
        rows, cols = _targets(labels)
        m_hot = torch.zeros_like(cos)
        m_hot[rows, cols] = self.margins(cos, rows, cols, margins).view(-1)
        return m_hot


class ElasticArcFace(_Elastic):
    """ElasticFace-Arc(+): target angle θ_y + m_i, differentiable, no ``th``/``mm`` fallback."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 std: float = 0.05, plus: bool = False) -> None:
        super().__init__(embedding_size, num_classes, s, m, std, plus)

    def forward(self, embeddings: Tensor, labels: Tensor, margins: Tensor | None = None) -> Tensor:
        self.check(embeddings, labels)
        cos = self.cosine(embeddings)
        return (cos.acos() + self.margin_grid(cos, labels, margins)).cos() * self.s


class ElasticCosFace(_Elastic):
    """ElasticFace-Cos(+): target cosine cos θ_y − m_i."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35,
                 std: float = 0.05, plus: bool = False) -> None:
        super().__init__(embedding_size, num_classes, s, m, std, plus)

    def forward(self, embeddings: Tensor, labels: Tensor, margins: Tensor | None = None) -> Tensor:
        self.check(embeddings, labels)
        cos = self.cosine(embeddings)
        return (cos - self.margin_grid(cos, labels, margins)) * self.s


def _xavier_cxd(kernel: Tensor) -> None:
    """SynFace's init of its [C, D] ``weight`` (xavier-uniform), into our [D, C] ``kernel``."""
    with torch.no_grad():
        w = torch.empty(kernel.shape[1], kernel.shape[0])
        nn.init.xavier_uniform_(w)
        kernel.copy_(w.t())


class SynFaceArcMargin(MarginHead):
    """SynFace ``ArcMarginProduct`` (s=30, m=0.5): ``th``/``mm`` ArcFace without clamping the cosine.

    The reference stores ``weight`` as [C, D] (xavier-uniform); here it is ``kernel`` [D, C].
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 30.0, m: float = 0.5, easy_margin: bool = False) -> None:
        super().__init__(embedding_size, num_classes, s, m, "CxD")
        _xavier_cxd(self.kernel)
        self.easy_margin = bool(easy_margin)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check(embeddings, labels)
        cos = self.raw_cosine(embeddings)
        sin = torch.sqrt((1.0 - torch.pow(cos, 2)).clamp(0, 1))
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > 0, phi, cos) if self.easy_margin else torch.where(cos > self.th, phi, cos - self.mm)
        one_hot = _one_hot(labels, cos)
        return ((one_hot * phi) + ((1.0 - one_hot) * cos)) * self.s


class SynFaceCosMargin(MarginHead):
    """SynFace ``CosMarginProduct`` (s=30, m=0.4): cos = <f, w> / max(|f||w|, 1e-8)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 30.0, m: float = 0.4) -> None:
        super().__init__(embedding_size, num_classes, s, m, "CxD")
        _xavier_cxd(self.kernel)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check(embeddings, labels)
        w = self.kernel.t().contiguous()  # the reference's [C, D] weight, for identical rounding
        ip = torch.mm(embeddings, w.t())
        denom = torch.outer(torch.norm(embeddings, 2, 1), torch.norm(w, 2, 1)).clamp(min=1e-8)
        cos = ip / denom
        return self.s * (cos - _one_hot(labels, cos) * self.m)


def _one_hot(labels: Tensor, like: Tensor) -> Tensor:
    one_hot = torch.zeros_like(like)
    rows, cols = _targets(labels)
    one_hot[rows, cols] = 1.0
    return one_hot


def synface_mixup_loss(
    classifier: nn.Module, embeddings: Tensor, syn_label: Tensor, real_label: Tensor, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """SynFace identity mixup + domain mixup on one batch; returns ``(logits, loss)``.

    ``syn_label`` rows are soft labels (class a, weight a, class b, weight b) of identity-mixed
    synthetic faces; ``real_label`` are the (offset) classes of the real images blended into the
    input with weight 1 − ``lam``. Logits mix the classifier run with each target:
    L = lam·(w_a·A(f,a) + w_b·A(f,b)) + (1−lam)·A(f,r); loss = lam·(mean(w_a·CE(L,a)) +
    mean(w_b·CE(L,b))) + (1−lam)·mean(CE(L,r)). ``lam=1`` is identity mixup alone.
    """
    if syn_label.dim() != 2 or syn_label.shape[1] != 4 or syn_label.shape[0] != embeddings.shape[0]:
        raise ValueError(f"syn_label must have shape [{embeddings.shape[0]}, 4], got {tuple(syn_label.shape)}")
    if real_label.shape != (embeddings.shape[0],):
        raise ValueError(f"real_label must have shape [{embeddings.shape[0]}], got {tuple(real_label.shape)}")
    label_a, w_a = syn_label[:, 0].long(), syn_label[:, 1].float()
    label_b, w_b = syn_label[:, 2].long(), syn_label[:, 3].float()
    out_a = classifier(embeddings, label_a)
    out_b = classifier(embeddings, label_b)
    out_r = classifier(embeddings, real_label.long())
    output = w_a.view(-1, 1) * out_a + w_b.view(-1, 1) * out_b
    output = lam * output + (1 - lam) * out_r
    loss_a = w_a * F.cross_entropy(output, label_a, reduction="none")
    loss_b = w_b * F.cross_entropy(output, label_b, reduction="none")
    loss = lam * (loss_a.mean() + loss_b.mean()) + (1 - lam) * F.cross_entropy(output, real_label.long(), reduction="none").mean()
    return output, loss


HEADS: dict[str, Callable[..., MarginHead]] = {
    "arcface": lambda d, c, **kw: ArcFace(d, c, **{"mode": "tface", **kw}),
    "arcface_insightface": lambda d, c, **kw: ArcFace(d, c, **{"mode": "insightface", **kw}),
    # CFSM's own ArcFace (GuidedFaceRecognition/losses.py): th/mm, sqrt(1.000001 - t^2), differentiated through,
    # centres [C, D] as its PartialFC stores them; its adversarial style step differentiates through this margin
    "arcface_cfsm": lambda d, c, **kw: ArcFace(d, c, **{"mode": "tface", "sin_eps": 1e-6, "centres_layout": "CxD", **kw}),
    "cosface": lambda d, c, **kw: CosFace(d, c, **kw),
    "cosface_insightface": lambda d, c, **kw: CosFace(d, c, **{"centres_layout": "CxD", **kw}),
    # AdaFace's training recipe (config.py: t_alpha 0.01); the head class keeps the reference's own default 1.0
    "adaface": lambda d, c, **kw: AdaFace(d, c, **{"t_alpha": 0.01, **kw}),
    "elastic_arc": lambda d, c, **kw: ElasticArcFace(d, c, **{"std": 0.05, **kw}),
    "elastic_arc_plus": lambda d, c, **kw: ElasticArcFace(d, c, **{"std": 0.0175, "plus": True, **kw}),
    "elastic_cos": lambda d, c, **kw: ElasticCosFace(d, c, **{"std": 0.05, **kw}),
    "elastic_cos_plus": lambda d, c, **kw: ElasticCosFace(d, c, **{"std": 0.02, "plus": True, **kw}),
    "synface_arc": lambda d, c, **kw: SynFaceArcMargin(d, c, **kw),
    "synface_cos": lambda d, c, **kw: SynFaceCosMargin(d, c, **kw),
}


def register_head(name: str, factory: Callable[..., MarginHead]) -> None:
    """Add a margin head: ``factory(embedding_size, num_classes, **head.kwargs)`` returns a module with a class-centre
    ``kernel`` [D, C] whose ``forward(embeddings, labels)`` gives the logits. Configs name it once its module is
    imported (``plugins``)."""
    HEADS[name] = factory


def build_head(name: str, embedding_size: int, num_classes: int, **kw) -> MarginHead:
    """Build a head by name (see ``HEADS``) with the published defaults; ``kw`` overrides them."""
    try:
        factory = HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}") from None
    return factory(embedding_size, num_classes, **kw)
