"""How faces reach a face-recognition model, and what comes out: sizes, pixel scaling, raw embeddings.

Every backbone declares ``input_size`` (H, W), ``channel_order`` and ``pixel_mean``/``pixel_std`` on the
0..255 scale (:mod:`synray.models.registry`); every caller that feeds one goes through here:

* :func:`fit_image` / :func:`fit_images`: uint8 RGB images (numpy, HWC) to the input size, with OpenCV
  (what the data loaders, the LDM context embedder and the evaluation do);
* :func:`fit_crops` / :func:`model_input`: float face crops in [0, 1] (torch, NCHW) resized and
  normalised on the device (what distillation does with generator output);
* :func:`normalize_images`: 0..255 batches to the model's pixel scale and channel order;
* :func:`raw_embedding`: the raw embedding of a forward pass (AdaFace's ``(x/|x|, |x|)`` multiplied back);
* :func:`embed` / :func:`embed_faces`: L2-normalised (flip-fused) embeddings of uint8 images.

torch is imported by the functions that use it, not at the top: the training loader's Ray Data decode
tasks use only the OpenCV part and stay free of torch (about 2 s and 200 MB less per worker process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from synray.evaluation.verification import fuse_flip

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = [
    "DEFAULT_INPUT_SIZE", "input_size", "fit_image", "fit_images", "fit_crops", "normalize_images", "model_input",
    "raw_embedding", "embed", "embed_faces",
]

#: the input size of a model that declares none (insightface's 112x112 aligned crop)
DEFAULT_INPUT_SIZE = (112, 112)


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a model takes: its ``input_size``, else 112x112."""
    h, w = getattr(model, "input_size", DEFAULT_INPUT_SIZE)
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# sizes


def fit_image(img: np.ndarray, size: tuple[int, int], shrink: int = cv2.INTER_AREA) -> np.ndarray:
    """One [H, W, C] image resized to ``size`` (H, W); returned as is when it already has that size.

    Shrinking (judged by the height) uses ``shrink``: area averaging by default, what the training
    loaders do, so a small model sees what it learnt on; insightface's ``.bin`` reader shrinks
    bilinearly (``cv2.INTER_LINEAR``). Enlarging is bilinear.
    """
    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    interp = shrink if img.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def fit_images(images: np.ndarray, size: tuple[int, int], shrink: int = cv2.INTER_AREA) -> np.ndarray:
    """Bring [N, H, W, 3] images to ``size`` (H, W).

    112x112 ArcFace-aligned faces become SynFace's 112x96 by cutting 8 columns each side: the
    ArcFace template is the 96x112 face.evoLVe template shifted by 8 px. Other sizes are resized by
    :func:`fit_image`.
    """
    h, w = int(size[0]), int(size[1])
    if images.shape[1:3] == (h, w):
        return images
    if images.shape[1:3] == (112, 112) and (h, w) == (112, 96):
        return np.ascontiguousarray(images[:, :, 8:104])
    return np.stack([fit_image(im, (h, w), shrink) for im in images])


def fit_crops(crops: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """Float crops [B, C, H, W] resized to ``size`` (H, W): bilinear (``align_corners=False``), antialiased
    when shrinking unless ``antialias`` is False (dlib's chips are plain bilinear)."""
    import torch.nn.functional as F

    size = (int(size[0]), int(size[1]))
    if tuple(crops.shape[-2:]) == size:
        return crops
    down = antialias and crops.shape[-1] > size[1]
    return F.interpolate(crops, size=size, mode="bilinear", align_corners=False, antialias=down)


# --------------------------------------------------------------------------------------------
# pixels


def normalize_images(model: nn.Module, images: Tensor, *, bgr: bool | None = None,
                     insightface_eval: bool = False) -> Tensor:
    """0..255 RGB batch (uint8 or float, (N, 3, H, W)) -> the normalised input ``model`` expects.

    ``bgr`` (default: the model's ``channel_order``) feeds the channels in BGR order. With
    ``insightface_eval`` the default scale is computed as insightface's evaluation scripts do,
    ``(x/255 - 0.5)/0.5``, which differs from ``(x - 127.5)/127.5`` in the last bit (the verification
    goldens were made that way); a model's own ``pixel_mean``/``pixel_std`` apply either way.
    """
    from torch import Tensor

    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) RGB batch, got {tuple(getattr(images, 'shape', ()))}")
    x = images.float() if not images.is_floating_point() else images
    if bgr if bgr is not None else getattr(model, "channel_order", "RGB") == "BGR":
        x = x.flip(1)
    mean, std = getattr(model, "pixel_mean", 127.5), getattr(model, "pixel_std", 127.5)
    if insightface_eval and mean == 127.5 and std == 127.5:
        return ((x / 255) - 0.5) / 0.5
    return (x - mean) / std


def model_input(model: nn.Module, crops: Tensor) -> Tensor:
    """Crops [B, 3, H, W] in [0, 1] -> the normalised input ``model`` expects (resized to its ``input_size``).

    With the model's own ``pixel_mean``/``pixel_std`` this is exactly SynthDistill's ``(x - 0.5) / 0.5`` for
    TinyFaR and ``(255 x - 127.5) / 128`` for the iresnet100 teacher.
    """
    from torch import Tensor

    if not isinstance(crops, Tensor) or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"{type(model).__name__}: expected face crops [B, 3, H, W] in [0, 1], "
                         f"got {tuple(getattr(crops, 'shape', ()))}")
    if getattr(model, "input_size", None) is not None:
        crops = fit_crops(crops, input_size(model))
    return normalize_images(model, crops * 255.0)


# --------------------------------------------------------------------------------------------
# outputs


def raw_embedding(out: Any) -> Tensor:
    """A backbone's raw embedding; AdaFace-style ``(x/|x|, |x|)`` outputs are multiplied back.

    Of another tuple output (features plus extras) the first element is the embedding.
    """
    if isinstance(out, (tuple, list)):
        if len(out) == 2 and out[1].dim() in (1, 2):
            return out[0] * out[1].reshape(-1, 1)
        return out[0]
    return out


def embed(
    model: nn.Module, images_uint8_rgb: np.ndarray, batch_size: int = 64, flip: bool = True,
    bgr: bool = False, device: str | torch.device | None = None,
) -> np.ndarray:
    """L2-normalised float64 embeddings of RGB uint8 images [N, H, W, 3] (already at the model's size).

    Pixels are normalised as insightface's evaluation does, ``(x/255 - 0.5)/0.5``, NCHW (or with the
    model's own ``pixel_mean``/``pixel_std`` when it declares others). With ``flip`` the raw
    outputs of each image and its mirror image are summed before normalising (the flip test of
    insightface, TFace and AdaFace). ``bgr`` feeds channels in BGR order (AdaFace's released models).
    """
    import torch

    images = np.asarray(images_uint8_rgb)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3] RGB, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    raw, raw_flip = [], []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size]
                if bgr:
                    batch = batch[..., ::-1]
                # Ray hands workers read-only arrays (zero-copy from the object store); torch warns on those
                x = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2)
                x = normalize_images(model, x, bgr=False, insightface_eval=True)
                raw.append(raw_embedding(model(x)).float().cpu().numpy().astype(np.float64))
                if flip:
                    raw_flip.append(raw_embedding(model(torch.flip(x, dims=[3]))).float().cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    emb = np.concatenate(raw) if raw else np.zeros((0, 0))
    return fuse_flip(emb, np.concatenate(raw_flip) if flip else None)


def embed_faces(model: nn.Module, images_uint8_rgb: np.ndarray, **kwargs: Any) -> np.ndarray:
    """:func:`embed` after bringing the faces to the model's ``input_size`` (112x112 if it has none)."""
    return embed(model, fit_images(np.asarray(images_uint8_rgb), input_size(model)), **kwargs)
