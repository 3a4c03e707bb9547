"""Class-centre sharding across data-parallel workers (TFace dist-FC, insightface PartialFC v2).

Identity counts of synthetic sets (10K-1M classes x 512-d centres) need not fit one device, so every
worker owns a contiguous slice of the class centres: rank r of W holds ``C//W + (r < C%W)`` classes
starting at ``C//W·r + min(r, C%W)`` (the split of both TFace and insightface). A step then:

1. all-gathers the embeddings and labels of the global batch;
2. optionally samples centres (PartialFC): the positive classes of the global batch are always kept,
   the rest are drawn uniformly until ``int(sample_rate · num_local)`` centres are active;
3. runs the margin head (any :mod:`synray.models.heads` head) on the local, possibly sampled,
   centres, with labels outside the local slice set to -1 (no margin there);
4. computes the softmax cross-entropy with a global max and a global sum of exponentials.

Gradient conventions, chosen so that training equals full softmax on one device at rate 1.0: the loss
value is identical on every rank; an all-reduce passes its output gradient straight through (each rank
differentiates its own contribution), the all-gather backward sums the embedding gradients of all
ranks and keeps the local rows, multiplied by ``grad_scale`` (the world size by default) so that DDP's
gradient *averaging* of the backbone yields the gradient of the global-batch loss.

Targets are soft: a list of ``(labels, weights)`` per row. The logits are the weighted mix of the
head run with each target (SynFace's mixed ArcMargin logits) and the loss is
``sum_k mean_i(w_ik · CE(logits_i, labels_ik))``; one target with weight 1 is ordinary training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from synray.training.mixup import Target, mixed_logits

__all__ = [
    "Target", "class_split", "ShardedClassifier", "all_gather_rows", "all_reduce_sum", "distributed_soft_cross_entropy",
    "sample_centres",
]


def class_split(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of the centres owned by ``rank``; remainder classes go to the first ranks."""
    if num_classes < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad class split request: num_classes={num_classes}, world_size={world_size}, rank={rank}")
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be sharded over {world_size} workers (need >= 1 class each)")
    base, rem = divmod(num_classes, world_size)
    return base * rank + min(rank, rem), base + int(rank < rem)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized row blocks of all ranks; backward = sum over ranks, local rows, x scale."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        rank, world = _world()
        ctx.rank, ctx.rows, ctx.scale = rank, x.shape[0], scale
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, dist.ReduceOp.SUM)
        local = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return local * ctx.scale, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient passes straight through (the downstream loss is replicated)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad


def all_gather_rows(x: Tensor, grad_scale: float | None = None) -> Tensor:
    """Global batch from equal-sized local batches (identity when not distributed)."""
    rank, world = _world()
    if world == 1:
        return x
    return _AllGather.apply(x, float(world if grad_scale is None else grad_scale))


def all_reduce_sum(x: Tensor) -> Tensor:
    _, world = _world()
    return x if world == 1 else _AllReduceSum.apply(x)


def _all_reduce_max_(x: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(x, dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def _gather_plain(x: Tensor) -> Tensor:
    """All ranks' equal-sized row blocks, concatenated (no gradient)."""
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def distributed_soft_cross_entropy(logits: Tensor, local_targets: Sequence[Target]) -> Tensor:
    """``sum_k mean_i(w_ik · (logsumexp_global(logits_i) - logits_i[y_ik]))`` over class-sharded logits.

    ``logits`` [N, c_local] are this rank's columns for the global batch; each target's labels are
    already local column ids (-1 where the class lives on another rank or there is none). With one
    rank this is ordinary (soft-target) cross-entropy.
    """
    with torch.no_grad():
        row_max = _all_reduce_max_(logits.max(dim=1).values.clone())
    shifted = logits - row_max.unsqueeze(1)
    columns = [shifted.exp().sum(dim=1)]
    for t in local_targets:
        rows = torch.where(t.labels >= 0)[0]
        columns.append(torch.zeros_like(columns[0]).index_put((rows,), shifted[rows, t.labels[rows]]))
    # one collective for the sum of exponentials and every target's logit (owned by exactly one rank)
    summed = all_reduce_sum(torch.stack(columns, dim=1))
    lse = summed[:, 0].log()
    loss = logits.new_zeros(())
    for k, t in enumerate(local_targets):
        loss = loss + (t.weights.to(lse.dtype) * (lse - summed[:, k + 1])).mean()
    return loss


def sample_centres(positive: Tensor, num_local: int, num_sample: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted local centre ids to activate: every positive, topped up uniformly to ``num_sample``.

    insightface PartialFC v2: random scores with positives forced to the top; when the positives
    alone exceed ``num_sample`` they are all used.
    """
    positive = torch.unique(positive)
    if positive.numel() >= num_sample:
        return positive.sort().values
    scores = torch.rand(num_local, generator=generator, device="cpu").to(positive.device)
    scores[positive] = 2.0
    return torch.topk(scores, k=num_sample).indices.sort().values


class ShardedClassifier(nn.Module):
    """The local slice of the class centres plus the margin head that scores them.

    ``head`` is a :mod:`synray.models.heads` module built for ``count`` classes; its ``kernel`` [D,
    count] is this rank's slice, global ids ``start .. start+count-1``. ``forward(embeddings,
    targets)`` returns ``(loss, cosine_argmax)``: the loss of the global batch and, for accuracy
    logging, the predicted global class of each local row (no margin, argmax across all ranks).
    """

    def __init__(
        self, head: nn.Module, num_classes: int, start: int, sample_rate: float = 1.0,
        grad_scale: float | None = None, seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not hasattr(head, "kernel"):
            raise ValueError(f"{type(head).__name__} has no class-centre 'kernel'; cannot shard it")
        self.head = head
        self.num_classes = int(num_classes)
        self.start = int(start)
        self.count = int(head.kernel.shape[1])
        if self.start < 0 or self.start + self.count > self.num_classes:
            raise ValueError(f"centre slice [{self.start}, {self.start + self.count}) outside {self.num_classes} classes")
        self.sample_rate = float(sample_rate)
        self.num_sample = max(1, int(self.sample_rate * self.count))
        self.grad_scale = grad_scale
        self._gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + self.start)

    @property
    def end(self) -> int:
        return self.start + self.count

    def reseed(self, seed: int) -> None:
        """Seed the centre sampling of the next step (a resumed run then samples what the uninterrupted one did)."""
        self._gen.manual_seed(int(seed))

    def _local(self, labels: Tensor) -> Tensor:
        inside = (labels >= self.start) & (labels < self.end)
        return torch.where(inside, labels - self.start, torch.full_like(labels, -1))

    def forward(self, embeddings: Tensor, targets: Sequence[Target]) -> tuple[Tensor, Tensor]:
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be [B, D], got {tuple(embeddings.shape)}")
        if not targets:
            raise ValueError("at least one target is needed")
        rows = embeddings.shape[0]
        for t in targets:
            if t.labels.shape != (rows,) or t.weights.shape != (rows,):
                raise ValueError(f"target labels and weights must have shape [{rows}], got {tuple(t.labels.shape)}, {tuple(t.weights.shape)}")
            bad = (t.labels >= self.num_classes) | (t.labels < -1)
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {self.num_classes}) or be -1, got {t.labels[bad][:5].tolist()}")
        emb = all_gather_rows(embeddings.float(), self.grad_scale)
        # labels (exact in float64) and weights of every target travel in one collective
        packed = _gather_plain(torch.stack([t.labels.double() for t in targets]
                                           + [t.weights.detach().double() for t in targets], dim=1))
        gathered = []
        for k in range(len(targets)):
            labels = packed[:, k].long()
            # a row without a target class contributes nothing for that target
            weights = torch.where(labels >= 0, packed[:, len(targets) + k].float(), torch.zeros_like(packed[:, k], dtype=torch.float32))
            gathered.append(Target(self._local(labels), weights))

        kernel = self.head.kernel
        if self.num_sample < self.count:
            positive = torch.cat([t.labels[t.labels >= 0] for t in gathered])
            index = sample_centres(positive, self.count, self.num_sample, self._gen)
            remap = torch.full((self.count,), -1, dtype=torch.long, device=index.device)
            remap[index] = torch.arange(index.numel(), device=index.device)
            gathered = [Target(torch.where(t.labels >= 0, remap[t.labels.clamp(min=0)], t.labels), t.weights) for t in gathered]
            kernel = kernel[:, index]
        else:
            index = None

        mixed = mixed_logits(lambda e, y: functional_call(self.head, {"kernel": kernel}, (e, y)), emb, gathered)
        loss = distributed_soft_cross_entropy(mixed, gathered)

        with torch.no_grad():
            pred = self._predict(emb, kernel, index)
        rank = _world()[0]
        return loss, pred[rank * rows:(rank + 1) * rows]

    def _predict(self, emb: Tensor, kernel: Tensor, index: Tensor | None) -> Tensor:
        """Global argmax of the plain cosine over all ranks' (active) centres."""
        cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(kernel, dim=0)
        val, idx = cos.max(dim=1)
        idx = (index[idx] if index is not None else idx) + self.start
        _, world = _world()
        if world == 1:
            return idx
        both = [torch.empty(val.shape[0], 2, dtype=torch.float64, device=val.device) for _ in range(world)]
        dist.all_gather(both, torch.stack([val.double(), idx.double()], dim=1))
        stacked = torch.stack(both)  # [world, N, 2]
        best = stacked[:, :, 0].argmax(dim=0)
        return stacked[:, :, 1].gather(0, best.view(1, -1)).view(-1).long()
