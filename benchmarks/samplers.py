"""Sampler cost: images/s and consistency for DDPM-1000 (IDiff-Face), DDIM-50 (ADMIS), UIFace two-stage
and DPM-Solver++ at 10/15/20 steps; the speedup at equal consistency.

All samplers run on one model with the same x_T and contexts (4 identities, one image each), one
torch thread, interleaved over ``--rounds`` rounds (best round kept: the least disturbed by other load).

**What "identity consistency" means here.** No trained identity-conditioned diffusion weights can be
loaded on this machine, and a random UNet is not a denoiser (sampled latents diverge). So every
sampler runs on a model whose output is the *exact* denoiser (MMSE eps) of a known identity-conditioned
distribution -- identity c's latents are N(m(c), 0.5^2 I) with m(c) = c W for a fixed random W, and
the empty context sees N(0, 1.25 I) -- while the published ConditionalUNet class (reduced width:
``UNetConfig.small()``, 512-d contexts, 3x32x32 latents as published; random weights) is evaluated at
every step and paid for in full; its attention maps drive UIFace's stage switch. Timings are real and
the samples have a ground truth: the probability-flow ODE takes x_T to m(c) + 0.5 xi(x_T) in closed
form. Identity consistency = mean cosine of each sampled latent to its identity's mean m(c) (synray's
quality score, the cosine of an image's embedding to its identity's context, with the latent as the
embedding). Reported with its error against the exact value for the same x_T, rank-1 identification
among all identity means, and the relative L2 distance to the exact ODE solution (meaningful for the
deterministic samplers; DDPM is stochastic). UIFace runs its own flavour (learnable empty context),
whose unconditional first stage and guidance move it off the conditional target by design.

The decoder is the small VQ (latents -> 64x64 RGB); images/s include it. Throughput ratios between
samplers are ratios of UNet evaluations (NFE), nearly independent of the model size; the column "H100
ceiling" gives img/s of the *published* 216M UNet + VQ-f4 decoder at 790 TFLOP/s from FLOPs counted here
with ``FlopCounterMode``. With a GPU the script also measures the published model on it.

    python benchmarks/samplers.py [--quick] [--quiet]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import (H100_FLOPS, gpu_info, log, machine, no_gpu_note, finish, parser, random_unet, setup, table)

DDPM_T = 1000
FAST_STEPS = (10, 15, 20)


def samplers() -> list[dict]:
    """(name, recipe, sample() kwargs, which model) in the order they are run."""
    out = [
        {"name": "DDPM-1000", "recipe": "IDiff-Face", "kw": {"method": "ddpm"}, "model": "cond", "slow": True},
        {"name": "DDIM-50", "recipe": "ADMIS", "kw": {"method": "ddim", "steps": 50, "eta": 0.0}, "model": "cond"},
        {"name": "DDIM-50 textbook", "recipe": "-", "kw": {"method": "ddim", "steps": 50, "eta": 0.0, "mode": "textbook"},
         "model": "cond"},
        {"name": "UIFace 2-stage (DDIM-50)", "recipe": "UIFace", "kw": {"method": "uiface", "steps": 50}, "model": "uiface"},
    ]
    for s in FAST_STEPS:
        out.append({"name": f"DPM-Solver++ {s}", "recipe": "fast", "kw": {"method": "dpmpp", "steps": s}, "model": "cond"})
    return out


DATA_STD = 0.5  # spread of one identity's latents around its mean
UNET_WEIGHT = 0.0  # the UNet runs (and is paid for) at every evaluation; its eps does not enter the output


class NFECounter:
    """Counts UNet evaluations per image (a forward on a batch of B counts B / batch images)."""

    def __init__(self, model: torch.nn.Module):
        self.images = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.images += int(args[0].shape[0])


class IdentityGaussianDenoiser(torch.nn.Module):
    """eps = exact MMSE eps of identity-conditioned Gaussian latents + ``UNET_WEIGHT`` x the UNet's eps.

    Takes the ConditionalUNet's full call signature (attention injection, condition flags), so every
    sampler, UIFace's included, runs unchanged and pays for every UNet evaluation.
    """

    def __init__(self, unet: torch.nn.Module, latent: tuple[int, int, int], seed: int = 0):
        super().__init__()
        from synray.diffusion.schedule import linear_schedule

        self.unet = unet
        self.latent = latent
        g = torch.Generator().manual_seed(seed + 7)
        d = unet.config.context_input_channels
        self.register_buffer("W", torch.randn(d, int(np.prod(latent)), generator=g))
        self.register_buffer("alpha_bars", linear_schedule().alpha_bars.float())

    def exact(self, x_T: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Where the probability-flow ODE takes x_T for this distribution: m + DATA_STD * xi (closed form)."""
        ab = self.alpha_bars[-1].to(x_T.device)
        m = self.means(context)
        xi = (x_T - ab.sqrt() * m) / (ab * DATA_STD ** 2 + 1 - ab).sqrt()
        return m + DATA_STD * xi

    def means(self, context: torch.Tensor) -> torch.Tensor:
        c = torch.nn.functional.normalize(context.float(), dim=1) * np.sqrt(context.shape[1])
        return (c @ self.W / np.sqrt(self.W.shape[0])).view(-1, *self.latent)  # elements ~ N(0, 1)

    def forward(self, x, t, context=None, dropout_mask=None, condition_flag=None, return_attn=False, **kw):
        out = self.unet(x, t, context, dropout_mask=dropout_mask, condition_flag=condition_flag,
                        return_attn=return_attn, **kw)
        eps_net = out[0] if return_attn else out
        ab = self.alpha_bars.to(x.device)[t.long()].view(-1, 1, 1, 1)
        cond = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if context is not None else \
            torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if dropout_mask is not None:
            cond = cond & ~dropout_mask.bool()
        if condition_flag is not None:
            cond = cond & condition_flag.bool()
        m = self.means(context) * cond.view(-1, 1, 1, 1) if context is not None else torch.zeros_like(x)
        var = torch.where(cond, torch.tensor(DATA_STD ** 2, device=x.device), torch.tensor(1 + DATA_STD ** 2, device=x.device))
        var = var.view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * var + 1 - ab) + UNET_WEIGHT * eps_net
        return (eps, out[1], out[2]) if return_attn else eps


def run_sampler(model, counter: NFECounter, x_T: torch.Tensor, ctx: torch.Tensor, kw: dict, seed: int) -> tuple[torch.Tensor, float, float]:
    from synray.diffusion.sampling import sample

    kw = dict(kw)
    if kw["method"] == "ddpm":
        kw["generator"] = [torch.Generator().manual_seed(seed + k) for k in range(len(x_T))]
    counter.images = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        z = sample(model, x_T.clone(), ctx, **kw)
    if z.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return z, seconds, counter.images / len(x_T)


def consistency(model: IdentityGaussianDenoiser, z: torch.Tensor, ctx: torch.Tensor, all_means: torch.Tensor) -> tuple[float, float]:
    """Mean cosine of each latent to its identity's mean, and rank-1 identification among all means."""
    zf = torch.nn.functional.normalize(z.flatten(1).double().cpu(), dim=1)
    mf = torch.nn.functional.normalize(all_means.flatten(1).double().cpu(), dim=1)
    own = torch.nn.functional.normalize(model.means(ctx).flatten(1).double().cpu(), dim=1)
    cos = (zf * own).sum(1)
    scores = zf @ mf.T
    rank1 = (scores.argmax(1) == torch.arange(len(z))).double().mean().item()
    return cos.mean().item(), rank1


def count_flops(unet_cfg, vq_cfg, latent: tuple[int, int, int]) -> tuple[float, float]:
    """GFLOP of one UNet evaluation and of one decode (batch 1, counted on meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    from synray.models.unet import ConditionalUNet
    from synray.models.vq import VQDecoder

    with torch.device("meta"):
        u, vq = ConditionalUNet(unet_cfg).eval(), VQDecoder(vq_cfg).eval()
        x = torch.zeros(1, *latent)
        with FlopCounterMode(display=False) as f:
            u(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, u.config.context_input_channels))
        unet = f.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as f:
            vq.decode(x)
        dec = f.get_total_flops() / 1e9
    return unet, dec


def measure(unet_cfg, vq_cfg, latent, batch: int, rounds: int, device: str, seed: int = 0) -> dict:
    """Every sampler on one model pair; per-sampler seconds, NFE, consistency, distance to DDIM-1000."""
    from synray.models.vq import VQDecoder
    from synray.synthesis.contexts import gaussian

    unets = {"cond": random_unet(unet_cfg, seed=seed), "uiface": random_unet(unet_cfg.replace(learn_empty_context=True), seed=seed)}
    counters = {k: NFECounter(u) for k, u in unets.items()}
    models = {k: IdentityGaussianDenoiser(u, latent, seed).eval().to(device) for k, u in unets.items()}
    torch.manual_seed(seed + 1)
    vq = VQDecoder(vq_cfg).eval().to(device)
    g = torch.Generator().manual_seed(seed + 2)
    x_T = torch.randn(batch, *latent, generator=g).to(device)
    ctx = torch.from_numpy(gaussian(seed, np.arange(batch), unet_cfg.context_input_channels)).float().to(device)
    all_means = models["cond"].means(ctx)

    def decode(z):
        t0 = time.perf_counter()
        with torch.no_grad():
            vq.decode(z)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    exact = models["cond"].exact(x_T, ctx)
    exact_consistency = consistency(models["cond"], exact, ctx, all_means)[0]
    res = {s["name"]: {**{k: v for k, v in s.items() if k != "kw"}, "kw": s["kw"], "seconds": [], "decode_seconds": []}
           for s in samplers()}
    for r in range(rounds):
        for s in samplers():
            if s.get("slow") and r > 0:
                continue
            rec = res[s["name"]]
            z, secs, nfe = run_sampler(models[s["model"]], counters[s["model"]], x_T, ctx, s["kw"], seed + 100)
            rec["decode_seconds"].append(decode(z))
            rec["seconds"].append(secs)
            rec["nfe"] = nfe
            rec["consistency"], rec["rank1"] = consistency(models[s["model"]], z, ctx, all_means)
            rec["consistency_error"] = abs(rec["consistency"] - exact_consistency)
            rec["distance_to_exact"] = ((z - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).mean().item()
            log(f"  round {r + 1}: {s['name']}: {secs:.2f} s, NFE {nfe:.0f}, consistency {rec['consistency']:.4f} "
                f"(exact {exact_consistency:.4f}), distance to the exact ODE solution {rec['distance_to_exact']:.4f}")
    for rec in res.values():
        best, dec = min(rec["seconds"]), min(rec["decode_seconds"])
        rec["images_per_second"] = batch / (best + dec)
        rec["sampler_images_per_second"] = batch / best
    return {"samplers": res, "exact_consistency": exact_consistency, "batch": batch, "device": device}


def speedups(res: dict) -> dict:
    """Speedups of the fastest DPM-Solver++ setting whose consistency error <= DDIM-50's (or <= 0.005)."""
    s = res["samplers"]
    ddim = s["DDIM-50"]
    fast = [s[f"DPM-Solver++ {k}"] for k in FAST_STEPS]
    equal = [f for f in fast if f["consistency_error"] <= max(ddim["consistency_error"], 0.005)]
    pick = min(equal, key=lambda f: f["nfe"]) if equal else fast[-1]
    out = {"fast_sampler": pick["name"], "equal_consistency": bool(equal), "fast_consistency": pick["consistency"],
           "ddim50_consistency": ddim["consistency"]}
    for other in ("DDPM-1000", "DDIM-50", "UIFace 2-stage (DDIM-50)"):
        out[f"vs {other}"] = pick["images_per_second"] / s[other]["images_per_second"]
        out[f"vs {other} (sampler only)"] = pick["sampler_images_per_second"] / s[other]["sampler_images_per_second"]
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=4, help="identities (one image each) per sampler call")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the fast samplers (best kept)")
    args = p.parse_args()
    setup(args)
    from synray.models.unet import UNetConfig
    from synray.models.vq import VQConfig

    from common import SMALL_VQ, TINY_UNET

    info = machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if args.quick:
        unet_cfg, latent, batch, rounds = UNetConfig(**TINY_UNET), (3, 16, 16), 2, 1
    else:
        unet_cfg, latent, batch, rounds = UNetConfig.small(), (3, 32, 32), args.batch, args.rounds
    vq_cfg = VQConfig.from_dict(SMALL_VQ)
    log(f"CPU: {'tiny' if args.quick else 'small'} UNet, latent {latent}, batch {batch}, 1 torch thread")
    cpu = measure(unet_cfg, vq_cfg, latent, batch, rounds, "cpu")
    torch.set_num_threads(threads)
    cpu_flops = count_flops(unet_cfg, vq_cfg, latent)
    pub_flops = count_flops(UNetConfig.published(), VQConfig(), (3, 32, 32))
    results = {"cpu": cpu, "cpu_model_gflop": {"unet_per_nfe": cpu_flops[0], "decode": cpu_flops[1]},
               "published_gflop": {"unet_per_nfe": pub_flops[0], "decode": pub_flops[1]}}
    results["speedup"] = speedups(cpu)
    gpu = gpu_info()
    if gpu is not None:
        log(f"GPU: published UNet + VQ-f4 decoder on {gpu['name']}, batch 50")
        results["gpu"] = measure(UNetConfig.published(), VQConfig(), (3, 32, 32), 50, 1, "cuda")
        results["gpu_speedup"] = speedups(results["gpu"])

    rows = []
    base = cpu["samplers"]["DDPM-1000"]["images_per_second"]
    for name, r in cpu["samplers"].items():
        flops = r["nfe"] * pub_flops[0] + pub_flops[1]
        row = {"sampler": name, "recipe": r["recipe"], "NFE/img": r["nfe"], "CPU img/s": r["images_per_second"],
               "x DDPM-1000": r["images_per_second"] / base, "ID consistency": r["consistency"],
               "error vs exact": r["consistency_error"], "rank-1": r["rank1"],
               "dist. to exact ODE": r["distance_to_exact"], "H100 ceiling img/s": H100_FLOPS / (flops * 1e9)}
        if gpu is not None:
            g = results["gpu"]["samplers"][name]
            row["GPU img/s"] = g["images_per_second"]
            row["H100 util"] = g["images_per_second"] / row["H100 ceiling img/s"]
        rows.append(row)
    sp = results["speedup"]
    srows = [{"fast sampler at equal consistency": sp["fast_sampler"], "equal reached": sp["equal_consistency"],
              "consistency (fast / DDIM-50)": f"{sp['fast_consistency']:.4f} / {sp['ddim50_consistency']:.4f}",
              "x DDPM-1000": sp["vs DDPM-1000"], "x DDIM-50": sp["vs DDIM-50"], "x UIFace": sp["vs UIFace 2-stage (DDIM-50)"]}]
    notes = [
        "ID consistency = mean cosine of each sampled latent to its identity's mean, under the exact denoiser of "
        f"identity-conditioned Gaussian latents (random UNet evaluated and paid for each step); exact value for these x_T: "
        f"{cpu['exact_consistency']:.4f}; equal consistency = |error| <= max(DDIM-50's, 0.005); DDPM is stochastic, so "
        "its distance to the ODE solution is not an error",
        f"CPU img/s include the decode ({cpu_flops[1]:.2f} GFLOP small VQ); UNet {cpu_flops[0]:.2f} GFLOP/NFE at this size",
        f"H100 ceiling: published UNet {pub_flops[0]:.2f} GFLOP/NFE + VQ-f4 decode {pub_flops[1]:.1f} GFLOP at 790 TFLOP/s, 100% MFU",
    ]
    if gpu is None:
        notes.append(no_gpu_note())
    finish("samplers", args, info, results, [table(rows), table(srows)], notes)


if __name__ == "__main__":
    main()
