"""1:1 pair verification as insightface, TFace/AdaFace and SynFace score it (LFW-family ``.bin`` sets).

insightface / TFace / AdaFace (identical maths, :func:`evaluate`): squared L2 distance of the
L2-normalised (flip-fused) embeddings, thresholds ``arange(0, 4, 0.01)``, 10 contiguous folds (sklearn
``KFold`` without shuffling); for each fold the threshold with the best accuracy on the other nine
(first maximum, i.e. the lowest threshold) predicts "same" iff ``dist < threshold`` on the held-out
fold. TFace/AdaFace also report the per-fold thresholds and the false-rejected genuine pairs.

TAR@FAR (:func:`calculate_val`) needs ``scipy.interpolate.interp1d(kind="slinear")`` on a FAR curve
with repeated values, which scipy >= 1.9 rejects; :func:`slinear_interp` reproduces what scipy <= 1.8
returned instead of crashing.

SynFace (:func:`synface_accuracy`): cosine with ``+1e-5`` in the denominator, thresholds
``arange(-1, 1, 0.005)``, "same" iff ``cos > threshold``, and the **last** best threshold wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "accuracy_metrics", "l2_normalize", "fuse_flip", "kfold", "calculate_accuracy", "calculate_roc", "calculate_val",
    "slinear_interp", "evaluate", "VerificationResult", "RocResult", "synface_cosine", "synface_accuracy",
    "ACC_THRESHOLDS", "VAL_THRESHOLDS",
]

#: thresholds on the squared L2 distance used for accuracy and for TAR@FAR by insightface/TFace.
ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float64, as ``sklearn.preprocessing.normalize`` computes it."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, None]


def accuracy_metrics(results: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{prefix}<set>/accuracy`` of every set of a verification table (``average`` included), for MLflow."""
    return {f"{prefix}{name}/accuracy": r["accuracy"] for name, r in results.items()}


def fuse_flip(embeddings: np.ndarray, flipped: np.ndarray | None = None) -> np.ndarray:
    """Flip test: sum the raw embeddings of the images and of their mirror images, then normalise."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if flipped is not None:
        flipped = np.asarray(flipped, dtype=np.float64)
        if flipped.shape != emb.shape:
            raise ValueError(f"flip embeddings {flipped.shape} do not match embeddings {emb.shape}")
        emb = emb + flipped
    return l2_normalize(emb)


def kfold(n: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (train, test) index splits, sklearn ``KFold(n_folds, shuffle=False)`` sizes."""
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"need at least {max(n_folds, 2)} pairs for {n_folds}-fold evaluation, got {n}")
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    idx = np.arange(n)
    out, start = [], 0
    for size in sizes:
        test = idx[start:start + size]
        out.append((np.concatenate([idx[:start], idx[start + size:]]), test))
        start += size
    return out


def _split(embeddings: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"expected 2N embeddings in pair order a0, b0, a1, b1, ... for N={issame.shape[0]} pairs, "
            f"got shape {embeddings.shape}"
        )
    return embeddings[0::2], embeddings[1::2], issame


def squared_distance(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    diff = np.subtract(emb1, emb2)
    return np.sum(np.square(diff), 1)


def _counts(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, tn, fn for every threshold (prediction: ``dist < threshold``), by sorted search."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    same, diff = np.sort(dist[issame]), np.sort(dist[~issame])
    tp = np.searchsorted(same, thresholds, side="left")
    fp = np.searchsorted(diff, thresholds, side="left")
    return tp, fp, diff.size - fp, same.size - tp


def calculate_accuracy(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tpr, fpr, acc) per threshold; a rate with an empty denominator is 0 as in the reference."""
    tp, fp, tn, fn = _counts(np.atleast_1d(thresholds), dist, issame)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
        fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    acc = (tp + tn) / dist.size
    return tpr, fpr, acc


@dataclass
class RocResult:
    tpr: np.ndarray  #: per threshold, mean over the held-out folds
    fpr: np.ndarray
    accuracy: np.ndarray  #: per fold
    best_thresholds: np.ndarray  #: per fold (TFace/AdaFace report their mean)
    bad_case: list[int] = field(default_factory=list)  #: genuine pairs with dist > best threshold


def calculate_roc(
    thresholds: np.ndarray, emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, n_folds: int = 10
) -> RocResult:
    """insightface/TFace ``calculate_roc`` on normalised pair embeddings (squared-L2 thresholds)."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = min(len(issame), emb1.shape[0])
    dist = squared_distance(emb1, emb2)
    folds = kfold(n, n_folds)
    tprs = np.zeros((n_folds, len(thresholds)))
    fprs = np.zeros((n_folds, len(thresholds)))
    accuracy = np.zeros(n_folds)
    best = np.zeros(n_folds)
    bad_case: list[int] = []
    for k, (train, test) in enumerate(folds):
        _, _, acc_train = calculate_accuracy(thresholds, dist[train], issame[train])
        b = int(np.argmax(acc_train))
        best[k] = thresholds[b]
        tprs[k], fprs[k], _ = calculate_accuracy(thresholds, dist[test], issame[test])
        accuracy[k] = calculate_accuracy(thresholds[b:b + 1], dist[test], issame[test])[2][0]
        bad_case.extend(int(i) for i in test if issame[i] and dist[i] > thresholds[b])
    return RocResult(np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best, bad_case)


def slinear_interp(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """``interp1d(x, y, kind="slinear")(x_new)`` with scipy <= 1.8 semantics, duplicates allowed.

    scipy sorted x stably and built a degree-1 B-spline with knots ``[x0, x..., x_last]`` and
    coefficients y. Evaluating it interpolates between the last point whose x is the largest value
    <= ``x_new`` and the point after it (the first of the next larger x); an exact hit on a repeated
    x returns the y of the last repeat. A zero-length last interval evaluates to 0, as de Boor's
    recursion did.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two equally long 1-D arrays with at least 2 points, got {x.shape} and {y.shape}")
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    if not (x[0] <= x_new <= x[-1]):
        raise ValueError(f"A value ({x_new}) in x_new is outside the interpolation range [{x[0]}, {x[-1]}]")
    i = int(np.searchsorted(x, x_new, side="right")) - 1
    i = min(i, x.size - 2)
    xa, xb = x[i], x[i + 1]
    if xb == xa:
        return 0.0
    w = 1.0 / (xb - xa)
    return float(y[i] * (w * (xb - x_new)) + y[i + 1] * (w * (x_new - xa)))


def _val_far(threshold: float, dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(TAR, FAR) at one threshold; 0 when a fold has no genuine (or no impostor) pairs."""
    pred = np.less(dist, threshold)
    n_same, n_diff = int(np.sum(issame)), int(np.sum(~issame))
    ta = int(np.sum(pred & issame))
    fa = int(np.sum(pred & ~issame))
    return (ta / n_same if n_same else 0.0), (fa / n_diff if n_diff else 0.0)


def calculate_val(
    thresholds: np.ndarray, emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray,
    far_target: float = 1e-3, n_folds: int = 10,
) -> tuple[float, float, float]:
    """insightface ``calculate_val``: (TAR mean, TAR std, FAR mean) at ``far_target`` over folds.

    The threshold for each fold interpolates the training-fold FAR curve (scipy <= 1.8 rule, see
    :func:`slinear_interp`); 0 when the target FAR is never reached.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = min(len(issame), emb1.shape[0])
    dist = squared_distance(emb1, emb2)
    val = np.zeros(n_folds)
    far = np.zeros(n_folds)
    for k, (train, test) in enumerate(kfold(n, n_folds)):
        tp, fp, tn, fn = _counts(thresholds, dist[train], issame[train])
        n_diff = int(np.sum(~issame[train]))
        far_train = fp / n_diff if n_diff else np.zeros(len(thresholds))
        threshold = slinear_interp(far_train, thresholds, far_target) if np.max(far_train) >= far_target else 0.0
        val[k], far[k] = _val_far(threshold, dist[test], issame[test])
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


@dataclass
class VerificationResult:
    accuracy: np.ndarray  #: per fold
    best_thresholds: np.ndarray  #: per fold, squared L2
    tpr: np.ndarray  #: ROC over ACC_THRESHOLDS
    fpr: np.ndarray
    bad_case: list[int]
    val: float  #: TAR at FAR 1e-3
    val_std: float
    far: float

    @property
    def acc_mean(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def acc_std(self) -> float:
        return float(np.std(self.accuracy))

    @property
    def best_threshold_mean(self) -> float:
        return float(np.mean(self.best_thresholds))


def evaluate(embeddings: np.ndarray, issame: np.ndarray, n_folds: int = 10, far_target: float = 1e-3) -> VerificationResult:
    """insightface/TFace ``evaluate`` on L2-normalised embeddings in pair order (2N x D)."""
    emb1, emb2, issame = _split(embeddings, issame)
    roc = calculate_roc(ACC_THRESHOLDS, emb1, emb2, issame, n_folds)
    val, val_std, far = calculate_val(VAL_THRESHOLDS, emb1, emb2, issame, far_target, n_folds)
    return VerificationResult(roc.accuracy, roc.best_thresholds, roc.tpr, roc.fpr, roc.bad_case, val, val_std, far)


def synface_cosine(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """SynFace's pair score: <f1, f2> / (|f1||f2| + 1e-5), in the embeddings' own dtype."""
    a = np.sum(f1 * f2, axis=1)
    b = np.linalg.norm(f1, axis=1) * np.linalg.norm(f2, axis=1) + 1e-5
    return a / b


def synface_accuracy(
    predicts: np.ndarray, n_folds: int = 10, thresholds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SynFace ``obtain_acc`` on ``predicts`` = [[cosine, label], ...]: (fold accuracies, thresholds).

    Folds are ``[int(i*n/k), int((i+1)*n/k))``; the best threshold on the other folds is chosen
    with ``>=`` so the last maximum wins; "same" iff ``cos > threshold``.
    """
    predicts = np.asarray(predicts, dtype=np.float64)
    if predicts.ndim != 2 or predicts.shape[1] != 2:
        raise ValueError(f"predicts must be [N, 2] (cosine, label), got shape {predicts.shape}")
    thresholds = np.arange(-1.0, 1.0, 0.005) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    n = predicts.shape[0]
    score, label = predicts[:, 0], predicts[:, 1].astype(int)

    def acc(ths: np.ndarray, idx: np.ndarray) -> np.ndarray:
        pred = (score[idx][None, :] > ths[:, None]).astype(int)
        return np.count_nonzero(pred == label[idx][None, :], axis=1) / len(idx)

    accuracy, chosen = np.zeros(n_folds), np.zeros(n_folds)
    for i in range(n_folds):
        test = np.arange(int(i * n / n_folds), int((i + 1) * n / n_folds))
        train = np.setdiff1d(np.arange(n), test)
        a = acc(thresholds, train)
        best = len(a) - 1 - int(np.argmax(a[::-1]))
        chosen[i] = thresholds[best]
        accuracy[i] = acc(thresholds[best:best + 1], test)[0]
    return accuracy, chosen
