"""Calibrate the mini world's difficulty: train a small CNN on the train split, verify held-out pairs.

For each difficulty the script renders ``--identities x --per-identity`` training photos, trains a
small CNN with a CosFace (large-margin cosine) loss for ``--epochs`` epochs on CPU, and reports
insightface-style 10-fold verification accuracy on held-out identities (flip-summed embeddings,
squared L2 distance, thresholds 0..4 step 0.01). The default difficulty should leave such a model
clearly above chance and clearly below 100%. Plain PyTorch, no Ray.

    python benchmarks/world_difficulty.py --difficulties 0.5,1,1.5 --out outputs/bench/world_difficulty.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synray.world.world import World


def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))


class Block(nn.Module):
    """Downsampling residual block (two 3x3 convs, 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a = conv_bn(cin, cout, 2)
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.b(self.a(x)) + self.short(x))


class SmallFR(nn.Module):
    """A small face embedder (~0.48M parameters at width 16): conv stem, three residual stages, flatten -> 128-d (insightface-style head)."""

    def __init__(self, input_size: int = 56, dim: int = 128, width: int = 32):
        super().__init__()
        self.stem = conv_bn(3, width // 2, 1 if input_size <= 64 else 2)
        self.body = nn.Sequential(Block(width // 2, width), Block(width, 2 * width), Block(2 * width, 4 * width))
        side = (input_size if input_size <= 64 else input_size // 2) // 8
        self.bn = nn.BatchNorm2d(4 * width)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width * side * side, dim)
        self.out = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.body(self.stem(x)))
        return self.out(self.fc(self.drop(torch.flatten(x, 1))))


class CosFace(nn.Module):
    """Large-margin cosine loss: s * (cos(theta_y) - m) for the target class."""

    def __init__(self, dim: int, classes: int, s: float = 32.0, m: float = 0.3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.s, self.m = s, m

    def forward(self, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.w))
        logits = self.s * (cos - self.m * F.one_hot(y, cos.shape[1]))
        return F.cross_entropy(logits, y)


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    if images.shape[1] != size:
        images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()  # NCHW: channels-last input crashes some CPU conv backward kernels
    return (x - 127.5) / 128.0


def ten_fold_accuracy(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """insightface calculate_roc: contiguous folds, best threshold on 9 folds, strict ``dist < thr``."""
    thresholds = np.arange(0, 4, 0.01)
    folds = np.array_split(np.arange(len(dist)), 10)
    accs = []
    for k in range(10):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(10) if j != k])
        acc_train = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accs.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accs)), float(np.std(accs))


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        b = x[i : i + batch]
        out.append(model(b) + model(torch.flip(b, dims=[3])))
    return F.normalize(torch.cat(out)).numpy()


def run(difficulty: float, args: argparse.Namespace) -> dict:
    world = World(seed=args.seed, num_identities=args.identities, difficulty=difficulty, num_heldout=args.heldout)
    t0 = time.perf_counter()
    ids = np.repeat(np.arange(args.identities), args.per_identity)
    smp = np.tile(np.arange(args.per_identity), args.identities)
    train = world.render_batch(ids, smp)
    pair_images, issame = world.verification_pairs("heldout", args.pairs, seed=args.seed)
    render_s = time.perf_counter() - t0
    render_rate = (len(train) + len(pair_images)) / render_s

    torch.manual_seed(args.seed)
    x, y = to_tensor(train, args.input_size), torch.from_numpy(ids)
    xp = to_tensor(pair_images, args.input_size)
    model = SmallFR(args.input_size, width=args.width)
    head = CosFace(128, args.identities)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = math.ceil(len(x) / args.batch)
    total = args.epochs * steps_per_epoch
    warm = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    loss_v = float("nan")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch):
            idx = perm[i : i + args.batch]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], torch.flip(xb, dims=[3]), xb)
            loss = head(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_v = float(loss.detach())
        if args.verbose:
            print(f"  d={difficulty} epoch {epoch + 1}/{args.epochs} loss {loss_v:.3f} ({time.perf_counter() - t1:.0f}s)", flush=True)
    train_s = time.perf_counter() - t1
    e = embed(model, xp)
    dist = ((e[0::2] - e[1::2]) ** 2).sum(1)
    acc, std = ten_fold_accuracy(dist, issame)
    # Same model on the training identities (unseen photos) shows how much is generalisation gap.
    seen_pairs = world.verification_pairs("train", min(args.pairs, 400), seed=args.seed + 1)
    es = embed(model, to_tensor(seen_pairs[0], args.input_size))
    acc_seen, _ = ten_fold_accuracy(((es[0::2] - es[1::2]) ** 2).sum(1), seen_pairs[1])
    return {
        "difficulty": difficulty,
        "heldout_acc": acc,
        "heldout_std": std,
        "train_ids_acc": acc_seen,
        "final_loss": loss_v,
        "train_seconds": round(train_s, 1),
        "render_faces_per_s": round(render_rate, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--difficulties", default="0.5,1.0,1.5")
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--per-identity", type=int, default=12)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--input-size", type=int, default=56, help="photos are rendered at 112 and resized to this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default="outputs/bench/world_difficulty.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    rows = []
    for d in (float(v) for v in args.difficulties.split(",")):
        rows.append(run(d, args))
        r = rows[-1]
        print(f"difficulty {d:4.2f}: held-out {100 * r['heldout_acc']:5.2f} +- {100 * r['heldout_std']:4.2f}%  train-ids {100 * r['train_ids_acc']:5.2f}%  ({r['train_seconds']:.0f} s)", flush=True)
    print()
    print("| difficulty | held-out acc (10-fold) | train-id acc | final loss | train s | render faces/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['difficulty']:.2f} | {100 * r['heldout_acc']:.2f} +- {100 * r['heldout_std']:.2f} | "
            f"{100 * r['train_ids_acc']:.2f} | {r['final_loss']:.3f} | {r['train_seconds']:.0f} | {r['render_faces_per_s']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"config": config, "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
