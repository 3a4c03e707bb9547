"""FR embedders for context faces and identity-consistency scores.

An embedder spec is ``"<backbone registry name>:<checkpoint path>"`` for published weights (e.g.
``iresnet50:backbone.pth``) or the path of a synray checkpoint; weights load strictly with ``weights_only``.
Images are uint8 RGB, aligned 112x112; they are brought to the backbone's own input size.
"""

from __future__ import annotations

import numpy as np
import torch

from synray.models.export import load_any_backbone
from synray.models.inputs import embed_faces


class Embedder:
    """``flip``: add the mirror image's embedding before normalising (verification's flip fusion); ADMIS embeds each
    context face once (``extract_embed.py``), which is what contexts use by default (``contexts.flip``)."""

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 64, flip: bool = True):
        self.model = load_any_backbone(spec).eval().to(device)
        self.spec, self.batch_size, self.flip = spec, batch_size, flip

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings ``[N, D]`` of uint8 RGB images ``[N, H, W, 3]`` (flip-fused if ``flip``)."""
        if len(images) == 0:
            return np.zeros((0, 1), np.float32)
        # e.g. 112x112 context faces into a 32x32 world teacher
        emb = np.asarray(embed_faces(self.model, images, batch_size=self.batch_size, flip=self.flip), np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def embedding_dim(spec: str) -> int:
    """Width of the embeddings ``spec`` produces (one blank face through the model)."""
    return int(Embedder(spec, batch_size=1).embed(np.zeros((1, 112, 112, 3), np.uint8)).shape[1])


def consistency(emb: np.ndarray, identity: np.ndarray, anchors: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Cosine of each embedding to its identity's anchor (given, e.g. the context) or its identity mean."""
    out = np.full(len(emb), np.nan, np.float32)
    for i in np.unique(identity):
        sel = identity == i
        anchor = anchors[int(i)] if anchors is not None and int(i) in anchors else emb[sel].mean(0)
        anchor = anchor / max(float(np.linalg.norm(anchor)), 1e-12)
        out[sel] = np.clip(emb[sel] @ anchor, -1.0, 1.0)
    return out
