"""Sampler cost and identity consistency: DDPM-1000 (IDiff-Face), DDIM-50 (ADMIS), UIFace two-stage,
DPM-Solver++(2M) at 10/15/20 steps and UniPC at 3/4/5 steps; which few-step sampler matches DDIM-50.

**Part 1: the world LDM, real model output for every sampler.** The identity-conditioned LDM shipped in
``synray/assets/world`` (ConditionalUNet EMA weights, its VQ decoder and the world teacher FR model)
samples ``--identities`` novel world identities (from 256 on; the LDM was trained on 0-199) x
``--images`` images through synthesis's own ``LDMGenerator`` (same per-image seeds, so the same x_T,
for every sampler), contexts being the teacher's embeddings of each identity's context face, as in the
quickstart's ADMIS-style synthesis. Identity consistency = mean cosine of the teacher embedding of each
image to its identity's context (synray's quality score); "delta vs DDIM-50" is the paired mean
difference per image with its 95% interval; "cos to others" = mean cosine to the other identities'
contexts (what consistency is worth without identity); rank-1 = the image's nearest context is its own; "px to
ODE" = mean absolute difference in grey levels to the images of a fine solution of the
probability-flow ODE (DPM-Solver++ with 100 steps; ``--quick``: 40) -- DDPM and UIFace do not solve
that ODE, so for them it only says how different their images are. A sampler **matches DDIM-50** when
the 95% interval of its delta lies within +-MATCH_MARGIN (an equivalence test: a difference too
uncertain to bound does not count as a match). UIFace runs with the world LDM's own empty
context (the IDiff-Face flavour's zero context), its published switch threshold and w = 1.
DDPM-1000 runs on the first ``--ddpm-identities`` identities only (its delta is paired on those).

**Part 2: exact denoiser, ODE accuracy and the published model's cost.** A model whose output is the
exact denoiser (MMSE eps) of a known identity-conditioned distribution -- identity c's latents are
N(m(c), 0.5^2 I), m(c) = c W -- while the ConditionalUNet class (published structure, reduced width
``UNetConfig.small()``, 3x32x32 latents) is evaluated at every step and paid for, its output unused.
The probability-flow ODE then has a closed-form solution, so each deterministic sampler has an exact
consistency error and distance. UIFace is not run here: its stage switch and attention injection act
on the UNet, whose output this model discards (part 1 measures it). The column "H100 ceiling" gives
img/s of the *published* 216M UNet + VQ-f4 decoder at 790 TFLOP/s from FLOPs counted with
``FlopCounterMode``. With a GPU the script also measures the published model on it.

CPU throughput: one torch thread; part 2 interleaves ``--rounds`` rounds and keeps the best.

    python benchmarks/samplers.py [--quick] [--quiet] [--identities 96] [--images 2] [--ddpm-identities 32]
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from common import (
    H100_FLOPS,
    finish,
    gpu_info,
    log,
    machine,
    no_gpu_note,
    parser,
    random_unet,
    setup,
    table,
)

DDPM_T = 1000
DPM_STEPS = (10, 15, 20)
UNIPC_STEPS = (3, 4, 5)
MATCH_MARGIN = 0.02  # cosine: how far from DDIM-50's mean consistency still counts as equal
WORLD_START = 256  # the first identity the world LDM has not seen (quickstart: training identities rounded up to a unit)


def world_samplers(quick: bool) -> list[dict]:
    """Name, recipe and sampler block of every sampler measured on the world LDM, in run order."""
    out = [
        {"name": "DDIM-50", "recipe": "ADMIS", "sampler": {"method": "ddim", "steps": 50}},
        {"name": "DDPM-1000", "recipe": "IDiff-Face", "sampler": {"method": "ddpm"}, "subset": True},
        {"name": "DDIM-50 textbook", "recipe": "-", "sampler": {"method": "ddim", "steps": 50, "mode": "textbook"}},
        {"name": "UIFace 2-stage (DDIM-50)", "recipe": "UIFace", "sampler": {"method": "uiface", "steps": 50}},
        {"name": "DDIM-5", "recipe": "-", "sampler": {"method": "ddim", "steps": 5}},
    ]
    out += [{"name": f"DPM-Solver++ {s}", "recipe": "fast", "sampler": {"method": "dpmpp", "steps": s}} for s in DPM_STEPS]
    out += [{"name": f"UniPC {s}", "recipe": "fast", "sampler": {"method": "unipc", "steps": s}} for s in UNIPC_STEPS]
    out.append({"name": "UniPC 5 log-SNR", "recipe": "-", "sampler": {"method": "unipc", "steps": 5, "spacing": "logsnr"}})
    return out


class NFECounter:
    """Counts UNet evaluations per image (a forward on a batch of B counts B / batch images)."""

    def __init__(self, model: torch.nn.Module):
        self.images = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.images += int(args[0].shape[0])


# --- part 1: the world LDM ------------------------------------------------------------------------

def paired(diff: np.ndarray) -> tuple[float, float]:
    """Mean of per-image differences and its 95% half-interval."""
    return float(diff.mean()), float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff)))


def measure_world(identities: int, images: int, ddpm_identities: int, reference_steps: int, quick: bool) -> dict:
    """Every sampler through ``LDMGenerator`` on the shipped world LDM; consistency from the world teacher."""
    from synray.config.base import load_config
    from synray.config.synth import SynthConfig
    from synray.diffusion.sampling import sampler_config
    from synray.quickstart import load_assets, packaged_assets
    from synray.synthesis.embedders import Embedder, consistency
    from synray.synthesis.generators import LDMGenerator
    from synray.synthesis.pipeline import context_faces
    from synray.world.world import DEFAULT_DIFFICULTY

    assets = load_assets(packaged_assets())
    g, meta = assets["generator"], assets["meta"]
    cfg = load_config(None, SynthConfig, [
        f"seed={meta['world']['seed']}", f"identities.start={WORLD_START}", f"identities.count={identities}",
        "generator.type=ldm", f"generator.unet={g['unet']}", f"generator.vq_decoder={g['vq_decoder']}",
        f"generator.vq_config={json.dumps(g['vq_config'])}", f"generator.latent_shape={json.dumps(g['latent_shape'])}",
        f"generator.images_per_identity={images}", f"generator.batch_size={identities * images}",
        f"generator.world_difficulty={meta['world'].get('difficulty') or DEFAULT_DIFFICULTY}",
        "contexts.source=face_embeddings", f"contexts.dim={meta['context_dim']}"])
    ids = np.arange(WORLD_START, WORLD_START + identities)
    teacher = Embedder(assets["teacher"])
    contexts = teacher.embed(context_faces(cfg, ids)).astype(np.float32)
    anchors = {int(i): c for i, c in zip(ids, contexts)}
    labels = np.repeat(ids, images)
    gen = LDMGenerator(cfg)
    counter = NFECounter(gen.unet)

    def run(block: dict, n_ids: int) -> dict:
        gen.cfg.generator.sampler = sampler_config(block)
        counter.images = 0
        t0 = time.perf_counter()
        imgs = gen.generate(ids[:n_ids], contexts[:n_ids], np.full(n_ids, images))
        seconds = time.perf_counter() - t0
        emb = teacher.embed(imgs)
        q = consistency(emb, labels[:len(imgs)], anchors)
        scores = emb @ contexts[:n_ids].T
        own = np.repeat(np.arange(n_ids), images)
        rank1 = float(np.mean(np.argmax(scores, axis=1) == own))
        others = float(((scores.sum(1) - scores[np.arange(len(own)), own]) / max(n_ids - 1, 1)).mean())
        return {"images": imgs, "quality": q, "seconds": seconds, "nfe": counter.images / len(imgs), "rank1": rank1,
                "others": others}

    log(f"world LDM: {identities} identities x {images} images; ODE reference: DPM-Solver++ {reference_steps} steps")
    ref = run({"method": "dpmpp", "steps": reference_steps}, identities)
    check = run({"method": "unipc", "steps": reference_steps // 2, "order": 2}, identities)
    ref_check = float(np.abs(check["images"].astype(float) - ref["images"]).mean())
    res: dict[str, dict] = {}
    base = None
    for s in world_samplers(quick):
        n_ids = min(ddpm_identities, identities) if s.get("subset") else identities
        if n_ids == 0 or (quick and s.get("subset")):
            continue
        r = run(s["sampler"], n_ids)
        if s["name"] == "DDIM-50":
            base = r
        n = len(r["images"])
        delta, half = paired(r["quality"] - base["quality"][:n])
        rec = {"recipe": s["recipe"], "sampler": s["sampler"], "images": n, "nfe": r["nfe"], "seconds": r["seconds"],
               "images_per_second": n / r["seconds"], "consistency": float(r["quality"].mean()),
               "consistency_ddim50_same_images": float(base["quality"][:n].mean()),
               "delta_vs_ddim50": delta, "delta_half_interval": half,
               "matches_ddim50": abs(delta) + half <= MATCH_MARGIN, "rank1": r["rank1"], "cos_to_others": r["others"],
               "px_to_ode": float(np.abs(r["images"].astype(float) - ref["images"][:n]).mean()),
               "consistency_error_vs_ode": float(r["quality"].mean() - ref["quality"][:n].mean())}
        res[s["name"]] = rec
        log(f"  {s['name']}: {n} images, {r['seconds']:.1f} s, NFE {r['nfe']:.0f}, consistency {rec['consistency']:.4f}, "
            f"delta vs DDIM-50 {delta:+.4f} +- {half:.4f}, {rec['px_to_ode']:.2f} grey levels from the ODE solution")
    return {"samplers": res, "identities": identities, "images_per_identity": images,
            "ode_reference": {"sampler": f"DPM-Solver++ {reference_steps}", "consistency": float(ref["quality"].mean()),
                              "px_to_unipc_half_steps": ref_check}}


def world_summary(world: dict) -> dict:
    """The fewest-NFE sampler that matches DDIM-50, and its throughput against the references."""
    s = world["samplers"]
    fast = [r | {"name": k} for k, r in s.items() if r["recipe"] == "fast"]
    matching = [r for r in fast if r["matches_ddim50"]]
    pick = min(matching, key=lambda r: (r["nfe"], abs(r["delta_vs_ddim50"]))) if matching else None
    out = {"fast_sampler": pick["name"] if pick else None, "matches": [r["name"] for r in matching]}
    if pick:
        for other in ("DDIM-50", "DDPM-1000", "UIFace 2-stage (DDIM-50)"):
            if other in s:
                out[f"vs {other} (img/s)"] = pick["images_per_second"] / s[other]["images_per_second"]
                out[f"vs {other} (NFE)"] = s[other]["nfe"] / pick["nfe"]
    return out


# --- part 2: exact denoiser -----------------------------------------------------------------------

def exact_samplers() -> list[dict]:
    """(name, recipe, sampler block) in the order they are run; UIFace is measured in part 1 only."""
    out = [
        {"name": "DDPM-1000", "recipe": "IDiff-Face", "sampler": {"method": "ddpm"}, "slow": True},
        {"name": "DDIM-50", "recipe": "ADMIS", "sampler": {"method": "ddim", "steps": 50}},
        {"name": "DDIM-50 textbook", "recipe": "-", "sampler": {"method": "ddim", "steps": 50, "mode": "textbook"}},
    ]
    out += [{"name": f"DPM-Solver++ {s}", "recipe": "fast", "sampler": {"method": "dpmpp", "steps": s}} for s in DPM_STEPS]
    out += [{"name": f"UniPC {s}", "recipe": "fast", "sampler": {"method": "unipc", "steps": s}} for s in UNIPC_STEPS]
    out.append({"name": "UniPC 5 log-SNR", "recipe": "fast", "sampler": {"method": "unipc", "steps": 5, "spacing": "logsnr"}})
    return out


DATA_STD = 0.5  # spread of one identity's latents around its mean


class IdentityGaussianDenoiser(torch.nn.Module):
    """eps = the exact MMSE eps of identity-conditioned Gaussian latents; the UNet runs at every call for its cost."""

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

    def forward(self, x, t, context=None, dropout_mask=None):
        self.unet(x, t, context, dropout_mask=dropout_mask)  # paid for, not used: this model's output is exact
        ab = self.alpha_bars.to(x.device)[t.long()].view(-1, 1, 1, 1)
        cond = torch.full((x.shape[0],), context is not None, dtype=torch.bool, device=x.device)
        if dropout_mask is not None:
            cond = cond & ~dropout_mask.bool()
        m = self.means(context) * cond.view(-1, 1, 1, 1) if context is not None else torch.zeros_like(x)
        var = torch.where(cond, torch.tensor(DATA_STD ** 2, device=x.device), torch.tensor(1 + DATA_STD ** 2, device=x.device))
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * var.view(-1, 1, 1, 1) + 1 - ab)


def run_sampler(model, counter: NFECounter, x_T: torch.Tensor, ctx: torch.Tensor, block: dict, seed: int) -> tuple[torch.Tensor, float, float]:
    from synray.diffusion.sampling import sample, sampler_config

    cfg = sampler_config(block)
    noise = [torch.Generator().manual_seed(seed + k) for k in range(len(x_T))] if cfg.stochastic else None
    counter.images = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        z = sample(cfg, model, x_T.clone(), ctx, generator=noise)
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


def measure_exact(unet_cfg, vq_cfg, latent, batch: int, rounds: int, device: str, seed: int = 0) -> dict:
    """Every deterministic sampler (and DDPM) on the exact denoiser; seconds, NFE, consistency, distance to the ODE."""
    from synray.models.vq import VQDecoder
    from synray.synthesis.contexts import gaussian

    unet = random_unet(unet_cfg, seed=seed)
    counter = NFECounter(unet)
    model = IdentityGaussianDenoiser(unet, latent, seed).eval().to(device)
    torch.manual_seed(seed + 1)
    vq = VQDecoder(vq_cfg).eval().to(device)
    g = torch.Generator().manual_seed(seed + 2)
    x_T = torch.randn(batch, *latent, generator=g).to(device)
    ctx = torch.from_numpy(gaussian(seed, np.arange(batch), unet_cfg.context_input_channels)).float().to(device)
    all_means = model.means(ctx)

    def decode(z):
        t0 = time.perf_counter()
        with torch.no_grad():
            vq.decode(z)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    exact = model.exact(x_T, ctx)
    exact_consistency = consistency(model, exact, ctx, all_means)[0]
    res = {s["name"]: {"recipe": s["recipe"], "sampler": s["sampler"], "seconds": [], "decode_seconds": []}
           for s in exact_samplers()}
    for r in range(rounds):
        for s in exact_samplers():
            if s.get("slow") and r > 0:
                continue
            rec = res[s["name"]]
            z, secs, nfe = run_sampler(model, counter, x_T, ctx, s["sampler"], seed + 100)
            rec["decode_seconds"].append(decode(z))
            rec["seconds"].append(secs)
            rec["nfe"] = nfe
            rec["consistency"], rec["rank1"] = consistency(model, z, ctx, all_means)
            rec["consistency_error"] = abs(rec["consistency"] - exact_consistency)
            rec["distance_to_exact"] = ((z - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).mean().item()
            log(f"  round {r + 1}: {s['name']}: {secs:.2f} s, NFE {nfe:.0f}, consistency {rec['consistency']:.4f} "
                f"(exact {exact_consistency:.4f}), distance to the exact ODE solution {rec['distance_to_exact']:.4f}")
    for rec in res.values():
        best, dec = min(rec["seconds"]), min(rec["decode_seconds"])
        rec["images_per_second"] = batch / (best + dec)
        rec["sampler_images_per_second"] = batch / best
    return {"samplers": res, "exact_consistency": exact_consistency, "batch": batch, "device": device}


def exact_speedups(res: dict) -> dict:
    """Speedups of the fewest-NFE fast sampler whose consistency error <= DDIM-50's (or <= 0.005)."""
    s = res["samplers"]
    ddim = s["DDIM-50"]
    fast = [r | {"name": k} for k, r in s.items() if r["recipe"] == "fast"]
    equal = [f for f in fast if f["consistency_error"] <= max(ddim["consistency_error"], 0.005)]
    pick = min(equal, key=lambda f: (f["nfe"], f["consistency_error"])) if equal else min(fast, key=lambda f: f["consistency_error"])
    out = {"fast_sampler": pick["name"], "equal_consistency": bool(equal), "fast_consistency": pick["consistency"],
           "ddim50_consistency": ddim["consistency"], "equal": [f["name"] for f in equal]}
    for other in ("DDPM-1000", "DDIM-50"):
        out[f"vs {other}"] = pick["images_per_second"] / s[other]["images_per_second"]
        out[f"vs {other} (sampler only)"] = pick["sampler_images_per_second"] / s[other]["sampler_images_per_second"]
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--identities", type=int, default=96, help="world LDM: novel identities")
    p.add_argument("--images", type=int, default=2, help="world LDM: images per identity")
    p.add_argument("--ddpm-identities", type=int, default=32, help="world LDM: identities DDPM-1000 runs on (0: skip)")
    p.add_argument("--batch", type=int, default=4, help="exact denoiser: identities (one image each) per sampler call")
    p.add_argument("--rounds", type=int, default=2, help="exact denoiser: interleaved rounds (best time kept)")
    args = p.parse_args()
    setup(args)
    from common import SMALL_VQ, TINY_UNET

    from synray.models.unet import UNetConfig
    from synray.models.vq import VQConfig

    info = machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if args.quick:
        identities, images, reference_steps = 8, 2, 40
        unet_cfg, latent, batch, rounds = UNetConfig(**TINY_UNET), (3, 16, 16), 2, 1
    else:
        identities, images, reference_steps = args.identities, args.images, 100
        unet_cfg, latent, batch, rounds = UNetConfig.small(), (3, 32, 32), args.batch, args.rounds
    world = measure_world(identities, images, args.ddpm_identities, reference_steps, args.quick)
    vq_cfg = VQConfig.from_dict(SMALL_VQ)
    log(f"exact denoiser: {'tiny' if args.quick else 'small'} UNet, latent {latent}, batch {batch}, 1 torch thread")
    cpu = measure_exact(unet_cfg, vq_cfg, latent, batch, rounds, "cpu")
    torch.set_num_threads(threads)
    cpu_flops = count_flops(unet_cfg, vq_cfg, latent)
    pub_flops = count_flops(UNetConfig.published(), VQConfig(), (3, 32, 32))
    results = {"world": world, "world_summary": world_summary(world), "cpu": cpu,
               "cpu_model_gflop": {"unet_per_nfe": cpu_flops[0], "decode": cpu_flops[1]},
               "published_gflop": {"unet_per_nfe": pub_flops[0], "decode": pub_flops[1]}}
    results["speedup"] = exact_speedups(cpu)
    gpu = gpu_info()
    if gpu is not None:
        log(f"GPU: published UNet + VQ-f4 decoder on {gpu['name']}, batch 50")
        results["gpu"] = measure_exact(UNetConfig.published(), VQConfig(), (3, 32, 32), 50, 1, "cuda")
        results["gpu_speedup"] = exact_speedups(results["gpu"])

    def ceiling(nfe: float) -> float:
        return H100_FLOPS / ((nfe * pub_flops[0] + pub_flops[1]) * 1e9)

    wrows = [{"sampler": name, "recipe": r["recipe"], "images": r["images"], "NFE/img": r["nfe"],
              "CPU img/s": r["images_per_second"], "ID consistency": r["consistency"],
              "delta vs DDIM-50": f"{r['delta_vs_ddim50']:+.4f} +- {r['delta_half_interval']:.4f}",
              "matches DDIM-50": r["matches_ddim50"], "cos to others": r["cos_to_others"], "rank-1": r["rank1"],
              "px to ODE": r["px_to_ode"],
              "H100 ceiling img/s": ceiling(r["nfe"])} for name, r in world["samplers"].items()]
    ws = results["world_summary"]
    wsum = [{"fewest-NFE sampler matching DDIM-50": ws["fast_sampler"] or "none", "all matching": ", ".join(ws["matches"]) or "-",
             **{k: v for k, v in ws.items() if k.startswith("vs ")}}]
    rows = []
    base = cpu["samplers"]["DDPM-1000"]["images_per_second"]
    for name, r in cpu["samplers"].items():
        row = {"sampler": name, "recipe": r["recipe"], "NFE/img": r["nfe"], "CPU img/s": r["images_per_second"],
               "x DDPM-1000": r["images_per_second"] / base, "ID consistency": r["consistency"],
               "error vs exact": r["consistency_error"], "rank-1": r["rank1"],
               "dist. to exact ODE": r["distance_to_exact"], "H100 ceiling img/s": ceiling(r["nfe"])}
        if gpu is not None:
            g = results["gpu"]["samplers"][name]
            row["GPU img/s"] = g["images_per_second"]
            row["H100 util"] = g["images_per_second"] / row["H100 ceiling img/s"]
        rows.append(row)
    sp = results["speedup"]
    srows = [{"fewest-NFE sampler at equal consistency (exact)": sp["fast_sampler"], "equal reached": sp["equal_consistency"],
              "consistency (fast / DDIM-50)": f"{sp['fast_consistency']:.4f} / {sp['ddim50_consistency']:.4f}",
              "x DDPM-1000": sp["vs DDPM-1000"], "x DDIM-50": sp["vs DDIM-50"]}]
    ref = world["ode_reference"]
    notes = [
        f"world LDM: {world['identities']} novel identities x {world['images_per_identity']} images, teacher-embedding "
        f"consistency; ODE reference {ref['sampler']} (consistency {ref['consistency']:.4f}; UniPC with half its steps "
        f"lands {ref['px_to_unipc_half_steps']:.2f} grey levels from it); matches = the 95% interval of delta within "
        f"+-{MATCH_MARGIN}",
        "exact denoiser: consistency of sampled latents to their identity's mean; exact value for these x_T: "
        f"{cpu['exact_consistency']:.4f}; equal consistency = |error| <= max(DDIM-50's, 0.005); DDPM is stochastic, so its "
        "distance to the ODE solution is not an error",
        f"CPU img/s include the decode; exact-denoiser UNet {cpu_flops[0]:.2f} GFLOP/NFE, small VQ {cpu_flops[1]:.2f} GFLOP",
        f"H100 ceiling: published UNet {pub_flops[0]:.2f} GFLOP/NFE + VQ-f4 decode {pub_flops[1]:.1f} GFLOP at 790 TFLOP/s, 100% MFU",
    ]
    if gpu is None:
        notes.append(no_gpu_note())
    finish("samplers", args, info, results, [table(wrows), table(wsum), table(rows), table(srows)], notes)


if __name__ == "__main__":
    main()
