"""Face alignment: 5-point similarity transforms onto the canonical templates, and plain resizing.

Landmarks are 5 (x, y) points: left eye, right eye, nose tip, left and right mouth corner (image
left/right as detectors such as RetinaFace/MTCNN report them).

* :func:`estimate_norm` / :func:`norm_crop`: insightface ``face_align`` — least-squares similarity
  (Umeyama, as ``skimage.transform.SimilarityTransform.estimate``) onto the ArcFace 112x112
  template, scaled for other sizes (S/112, or S/128 with +8·S/128 in x for multiples of 128).
* :func:`synface_matrix`: SynFace / face.evoLVe ``warp_and_crop_face`` with the 96x112 reference
  points (output 112 high x 96 wide), same skimage similarity.
* :func:`cp2tform_matrix`: the original face.evoLVe MATLAB ``cp2tform`` port. It fits the inverse
  map (template -> image) by least squares and may choose a reflection, so it differs from Umeyama
  by up to ~0.3 px on noisy landmarks; kept for reproducing face.evoLVe-aligned data.
* :func:`resize`: what ADMIS/UIFace do with already-aligned generator output (bilinear 128 -> 112,
  ``F.interpolate(align_corners=False)`` without antialiasing).

All matrices are 2x3 float64 in OpenCV's convention (maps image coordinates to template
coordinates); :func:`warp` applies one with ``cv2.warpAffine`` (bilinear, black border).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCFACE_TEMPLATE", "ARCFACE_DST", "FACEVOLVE_REFERENCE_96x112", "arcface_template", "facevolve_reference", "umeyama",
    "similarity_matrix", "estimate_norm", "cp2tform_matrix", "synface_matrix", "warp", "norm_crop",
    "synface_crop", "resize", "landmarks68_to_5",
]

#: ArcFace 112x112 template (insightface ``arcface_dst``: left eye, right eye, nose tip, left and right
#: mouth corner), in float64 for geometry that is not insightface's (the world renderer aligns onto it).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
#: the same template in float32, as the reference holds it (insightface's alignment matrices need it).
ARCFACE_DST = ARCFACE_TEMPLATE.astype(np.float32)
#: face.evoLVe / SynFace reference points for a 96 wide x 112 high crop.
FACEVOLVE_REFERENCE_96x112 = np.array(
    [[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278],
     [33.54930115, 92.3655014], [62.72990036, 92.20410156]],
    dtype=np.float64,
)


def _points(pts: np.ndarray, what: str = "landmarks") -> np.ndarray:
    pts = np.asarray(pts)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise ValueError(f"{what} must be a [K, 2] array of (x, y) points with K >= 2, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return pts


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The ArcFace template for an ``image_size`` square crop (float32, like insightface)."""
    if image_size % 112 == 0:
        ratio, diff_x = float(image_size) / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = float(image_size) / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    return dst


def facevolve_reference(square: bool = False) -> np.ndarray:
    """face.evoLVe reference points: 96x112, or with ``square`` the 112x112 version (x + 8)."""
    ref = FACEVOLVE_REFERENCE_96x112.copy()
    if square:
        ref[:, 0] += (112 - 96) / 2
    return ref


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """3x3 least-squares similarity mapping ``src`` onto ``dst`` (Umeyama 1991, skimage's algorithm).

    Like skimage, the statistics are computed in the points' own precision (float32 landmarks stay
    float32 up to the SVD) and the result is float64; this reproduces insightface's matrices exactly.
    """
    src, dst = _points(src, "source points"), _points(dst, "destination points")
    if src.shape != dst.shape:
        raise ValueError(f"source {src.shape} and destination {dst.shape} points differ in shape")
    dtype = np.result_type(src.dtype, dst.dtype, np.float32)
    src, dst = src.astype(dtype, copy=False), dst.astype(dtype, copy=False)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(a)
    rank = int(np.count_nonzero(s > s.max() * max(a.shape) * np.finfo(float).eps))
    if rank == 0:
        raise ValueError("degenerate points: all source or destination points coincide")
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            s_last = d[dim - 1]
            d[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = s_last
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d) if estimate_scale else 1.0
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (skimage ``SimilarityTransform.estimate(src, dst).params[:2]``)."""
    return umeyama(src, dst)[:2, :]


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """insightface ``estimate_norm``: 2x3 matrix aligning 5 landmarks to the ArcFace template."""
    lm = np.asarray(landmarks)
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {lm.shape}")
    return similarity_matrix(lm, arcface_template(image_size))


def _cp2tform_nonreflective(uv: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB ``findNonreflectiveSimilarity``: solve xy -> uv by least squares, return (T, Tinv)."""
    m = xy.shape[0]
    x, y = xy[:, 0:1], xy[:, 1:2]
    X = np.vstack((np.hstack((x, y, np.ones((m, 1)), np.zeros((m, 1)))),
                   np.hstack((y, -x, np.zeros((m, 1)), np.ones((m, 1))))))
    U = np.vstack((uv[:, 0:1], uv[:, 1:2]))
    if np.linalg.matrix_rank(X) < 4:
        raise ValueError("cp2tform needs at least two distinct point pairs")
    r = np.squeeze(np.linalg.lstsq(X, U, rcond=None)[0])
    sc, ss, tx, ty = r
    t_inv = np.array([[sc, -ss, 0.0], [ss, sc, 0.0], [tx, ty, 1.0]])
    t = np.linalg.inv(t_inv)
    t[:, 2] = np.array([0.0, 0.0, 1.0])
    return t, t_inv


def _tformfwd(t: np.ndarray, uv: np.ndarray) -> np.ndarray:
    return (np.hstack((uv, np.ones((uv.shape[0], 1)))) @ t)[:, :-1]


def cp2tform_matrix(src: np.ndarray, dst: np.ndarray, reflective: bool = True) -> np.ndarray:
    """face.evoLVe ``get_similarity_transform_for_cv2``: 2x3 matrix from the MATLAB cp2tform port."""
    src = _points(src, "source points").astype(np.float64)
    dst = _points(dst, "destination points").astype(np.float64)
    if src.shape != dst.shape:
        raise ValueError(f"source {src.shape} and destination {dst.shape} points differ in shape")
    t, _ = _cp2tform_nonreflective(src, dst)
    if reflective:
        dst_r = dst.copy()
        dst_r[:, 0] = -dst_r[:, 0]
        t2r, _ = _cp2tform_nonreflective(src, dst_r)
        t2 = t2r @ np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        if np.linalg.norm(_tformfwd(t, src) - dst) > np.linalg.norm(_tformfwd(t2, src) - dst):
            t = t2
    return t[:, 0:2].T


def synface_matrix(landmarks: np.ndarray, method: str = "skimage", square: bool = False) -> np.ndarray:
    """SynFace / face.evoLVe alignment matrix onto the 96x112 (or ``square`` 112x112) reference.

    ``method="skimage"`` is SynFace's (Umeyama); ``"cp2tform"`` the original face.evoLVe port.
    Points are cast to float32 first, as ``warp_and_crop_face`` does.
    """
    lm = np.asarray(landmarks)
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {lm.shape}")
    src = np.float32(lm)
    ref = np.float32(facevolve_reference(square))
    if method == "skimage":
        return similarity_matrix(src, ref)
    if method == "cp2tform":
        return cp2tform_matrix(src, ref)
    raise ValueError(f"unknown alignment method {method!r}; choose 'skimage' or 'cp2tform'")


def warp(image: np.ndarray, M: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine`` with bilinear interpolation and a black border; ``size`` is S or (H, W)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    M = np.asarray(M, dtype=np.float64)
    if M.shape != (2, 3):
        raise ValueError(f"M must be a 2x3 affine matrix, got shape {M.shape}")
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    return cv2.warpAffine(image, M, (w, h), borderValue=0.0)


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """insightface ``norm_crop``: the aligned ``image_size`` square face."""
    return warp(image, estimate_norm(landmarks, image_size), image_size)


def synface_crop(image: np.ndarray, landmarks: np.ndarray, method: str = "skimage") -> np.ndarray:
    """SynFace's aligned 112 (high) x 96 (wide) face."""
    return warp(image, synface_matrix(landmarks, method), (112, 96))


def resize(images: np.ndarray | torch.Tensor, size: int | tuple[int, int] = 112) -> np.ndarray | torch.Tensor:
    """Bilinear resize like ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias).

    Accepts a torch tensor [N, C, H, W] (returned as such) or numpy [H, W, C] / [N, H, W, C]; uint8
    input is rounded back to uint8. torch is imported here, not with the module: synthesis workers that
    never resize (the world generator's pipeline) start without it.
    """
    import torch
    import torch.nn.functional as F

    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"tensor images must be [N, C, H, W], got shape {tuple(images.shape)}")
        return F.interpolate(images, size=hw, mode="bilinear", align_corners=False)
    arr = np.asarray(images)
    if arr.ndim not in (3, 4):
        raise ValueError(f"images must be [H, W, C] or [N, H, W, C], got shape {arr.shape}")
    batch = arr[None] if arr.ndim == 3 else arr
    # float32, C-contiguous and writable in one copy at most (Ray hands workers read-only batches: torch warns)
    x = torch.from_numpy(np.require(batch, np.float32, ["C", "W"])).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=hw, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    if arr.dtype == np.uint8:
        y = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    else:
        y = y.astype(arr.dtype, copy=False)
    return y[0] if arr.ndim == 3 else y


def landmarks68_to_5(landmarks68: np.ndarray) -> np.ndarray:
    """Reduce 68-point (iBUG) landmarks to the 5 alignment points (eye centres, nose, mouth corners)."""
    lm = np.asarray(landmarks68, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks68 must have shape (68, 2), got {lm.shape}")
    return np.stack([
        (lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54],
    ]).astype(np.float32)
