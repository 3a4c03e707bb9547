"""What one GPU does with synray's fast path, next to the H100 ceilings of the anchors.

Four measurements, each printed beside its ceiling at 790 TFLOP/s (dense BF16, the anchors' H100 figure)
from FLOPs counted on the models themselves with ``FlopCounterMode``:

1. **generation**: images/s of synthesis's own ``LDMGenerator`` (sampler + UNet + VQ decode, batch ``auto``,
   decode on a side stream) with the published-size identity-conditioned UNet (216M parameters, random
   weights: speed does not depend on them) and the published VQ-f4 decoder, 3x32x32 latents -> 128 px, for
   DDIM-50 (ADMIS), DPM-Solver++ 15 and UniPC 5 (the step counts that match DDIM-50's identity consistency on
   the world LDM, ``benchmarks/README.md``) and UIFace's two-stage DDIM-50 (two UNet passes a step), each in
   fp32, bf16 (autocast, the default on CUDA) and bf16 + ``torch.compile``; bf16 + channels_last for UniPC 5;
2. **pipeline**: the generator's busy fraction inside the Ray Data pipeline (ADMIS recipe at the published
   size, UniPC 5, gaussian contexts, resize to 112, PNG shards) with one GPU actor, over the whole run and
   after its start;
3. **IR-50 + ArcFace training**: images/s and MFU of ``Learner.step`` (TFace IR-50, 10,000 classes, batch 512,
   SGD) in fp32, bf16 (+ channels_last, the CUDA default) and bf16 + ``torch.compile``;
4. **LDM training**: steps/s of ``LDMLearner.step`` (published UNet, batch 64 per GPU as in the references,
   fused Adam, EMA) in fp32 and bf16.

Targets on one H100: >= 1,000 generated img/s with the equal-quality fast sampler, >= 90% generator busy in
the pipeline, IR-50 training >= 3,000 img/s. The run stays within ``--budget`` seconds (default 330):
measurements that no longer fit are listed as skipped.

Without a CUDA device it refuses (exit code 2). ``--quick`` runs the same code on the CPU in seconds with
scaled-down models (small UNet and decoder, a tiny iresnet), no ``torch.compile`` and no Ray: the CPU-side
checks CI runs so the script cannot rot; it also checks the FLOP counts of the published models against the
anchors (13.79 GFLOP per UNet step, 161.2 per VQ-f4 decode, 12.6 per IR-50 forward).

    python benchmarks/gpu.py [--quick] [--quiet] [--budget 330] [--sections generation,pipeline,ir50,ldm]
"""

from __future__ import annotations

import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import (
    H100_FLOPS,
    ROOT,
    finish,
    gpu_info,
    log,
    machine,
    parser,
    random_unet,
    setup,
    table,
    workdir,
)

SECTIONS = ("generation", "pipeline", "ir50", "ldm")
TARGET_IMAGES_PER_SECOND, TARGET_BUSY, TARGET_IR50 = 1000.0, 0.90, 3000.0
#: the anchors' FLOP counts (shared/research/anchors.md, section 2b and 0); the counted ones must agree within 2%
ANCHOR_GFLOP = {"unet_step": 13.79, "vq_decode": 161.2, "ir50_forward": 12.62}
FLOP_TOLERANCE = 0.02
LATENT = (3, 32, 32)
CONTEXT_DIM = 512
SAMPLERS = (  # name, sampler block, UNet passes per image
    ("DDIM-50", {"method": "ddim", "steps": 50}, 50),
    ("DPM-Solver++ 15", {"method": "dpmpp", "steps": 15}, 15),
    ("UniPC 5", {"method": "unipc", "steps": 5}, 5),
    ("UIFace 2-stage DDIM-50", {"method": "uiface", "steps": 50}, 100),
)
FAST = "UniPC 5"  # the fast path's sampler: the one the generation target is about
VARIANTS = {  # name -> generator / scaling settings
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16": {"precision": "bf16", "channels_last": False},
    "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
    "bf16 + compile": {"precision": "bf16", "channels_last": False, "compile": True},
}


class Budget:
    """Wall-clock budget of the whole script; a measurement runs only if its estimate still fits."""

    def __init__(self, seconds: float):
        self.t0, self.total = time.perf_counter(), seconds

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- FLOPs -------------------------------------------------------------------------------------------

def count_gflop(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def published_gflop() -> dict[str, float]:
    """FLOPs of the published models, counted on the meta device (shapes only, no memory): one UNet step and
    one VQ-f4 decode per image, one IR-50 forward and one training step (forward + backward) per image."""
    from synray.models.registry import build_backbone
    from synray.models.unet import ConditionalUNet, UNetConfig
    from synray.models.vq import VQConfig, VQDecoder

    with torch.device("meta"):
        unet, vq = ConditionalUNet(UNetConfig.published("uiface")).eval(), VQDecoder(VQConfig()).eval()
        ir50 = build_backbone("tface_ir50")
        z = torch.zeros(1, *LATENT)
        out = {"unet_step": count_gflop(lambda: unet(z, torch.zeros(1, dtype=torch.long), torch.zeros(1, CONTEXT_DIM))),
               "vq_decode": count_gflop(lambda: vq.decode(z))}
        ir50.eval()
        out["ir50_forward"] = count_gflop(lambda: ir50(torch.zeros(1, 3, 112, 112)))
        ir50.train()
        out["ir50_train_step"] = count_gflop(lambda: ir50(torch.zeros(2, 3, 112, 112)).sum().backward()) / 2
        unet.train()
        out["unet_train_step"] = count_gflop(
            lambda: unet(torch.zeros(2, *LATENT), torch.zeros(2, dtype=torch.long), torch.zeros(2, CONTEXT_DIM)).sum().backward()) / 2
    return out


def check_flops(flops: dict[str, float]) -> list[str]:
    """Where the counted FLOPs disagree with the anchors (the ceilings would then be off)."""
    return [f"{k}: counted {flops[k]:.2f} GFLOP, anchor {v:.2f}" for k, v in ANCHOR_GFLOP.items()
            if abs(flops[k] / v - 1) > FLOP_TOLERANCE]


def measure_cell(rows: list[dict], raw: dict, key: str, row: dict, estimate: float, budget: Budget,
                 device: torch.device, label: str, measure) -> dict | None:
    """One table cell: skipped when its ``estimate`` no longer fits the budget, a "failed" row when ``measure``
    raises (e.g. a compile error must not hide the other variants), else ``measure()``'s record (also in ``raw``)."""
    if not budget.allows(estimate):
        rows.append({**row, "value": None, "note": "skipped: time budget"})
        return None
    log(label)
    try:
        r = measure()
    except Exception as exc:  # noqa: BLE001
        rows.append({**row, "value": None, "note": f"failed: {type(exc).__name__}: {str(exc)[:120]}"})
        raw[key] = {"error": repr(exc)}
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    raw[key] = r
    return r


def ceiling(gflop_per_item: float) -> float:
    return H100_FLOPS / (gflop_per_item * 1e9)


# --- models ------------------------------------------------------------------------------------------

def generation_models(device: torch.device, quick: bool):
    """(UNet, VQ decoder, latent shape): the published sizes, or the goldens' small ones with --quick."""
    from synray.models.unet import UNetConfig
    from synray.models.vq import VQConfig, VQDecoder

    if quick:
        unet_cfg, vq_cfg, latent = UNetConfig.small("uiface"), VQConfig.small(), (3, 8, 8)
    else:
        unet_cfg, vq_cfg, latent = UNetConfig.published("uiface"), VQConfig(), LATENT
    unet = random_unet(unet_cfg).to(device)
    torch.manual_seed(1)
    vq = VQDecoder(vq_cfg).eval().to(device)
    return unet, vq, latent


# --- 1. generation -----------------------------------------------------------------------------------

def generation_cell(unet, vq, latent, sampler: dict, variant: dict, device: torch.device, quick: bool,
                    seconds: float) -> dict:
    """Images/s of ``LDMGenerator.generate`` over whole batches (a warm-up first, which also compiles)."""
    from synray.config.synth import SynthConfig
    from synray.synthesis.neural_generators import LDMGenerator

    g = {"type": "ldm", "unet": "random-weights", "vq_decoder": "random-weights", "latent_shape": list(latent),
         "sampler": sampler, "images_per_identity": 1, "batch_size": 2 if quick else "auto", **variant}
    cfg = SynthConfig.model_validate({"generator": g, "contexts": {"dim": unet.config.context_input_channels}})
    gen = LDMGenerator(cfg, device=str(device), modules=(unet, vq))
    b = gen.batch_size
    ctx = np.random.default_rng(0).standard_normal((16 * b, unet.config.context_input_channels)).astype(np.float32)
    ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
    ids = np.arange(16 * b)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        images = gen.generate(ids[:n], ctx[:n], np.ones(n, np.int64))
        assert images.shape[0] == n
        return time.perf_counter() - t0

    warm = 0.0 if quick else run(b)  # compiles, picks cuDNN kernels
    per_batch = run(b) if variant.get("compile") else warm  # a compiling warm-up says nothing of the steady state
    batches = 1 if quick else int(min(16, max(1, round(seconds / max(per_batch, 1e-3)))))
    dt = run(batches * b)
    return {"batch": b, "images": batches * b, "seconds": dt, "images_per_second": batches * b / dt,
            "warmup_seconds": warm, "precision": str(gen.dtype)}


def generation(device: torch.device, quick: bool, flops: dict, budget: Budget) -> tuple[list[dict], dict]:
    unet, vq, latent = generation_models(device, quick)
    rows, raw = [], {}
    # in order of importance, as the budget may cut the tail: the default (bf16) path, fp32, then the options;
    # compiled last, the fast sampler first (each compiles its graphs; UIFace has three call patterns)
    fast = [s for s in SAMPLERS if s[0] == FAST]
    cells = [(s, "bf16") for s in SAMPLERS] + [(s, "fp32") for s in SAMPLERS] + [(s, "bf16 + channels_last") for s in fast]
    if not quick:
        cells += [(s, "bf16 + compile") for s in fast + [s for s in SAMPLERS if s[0] != FAST]]
    for (name, block, passes), variant in cells:
        for m in (unet, vq):  # a channels_last cell converts the shared modules: every cell starts from NCHW
            m.to(memory_format=torch.contiguous_format)
        per_image = passes * flops["unet_step"] + flops["vq_decode"]
        row = {"section": "generation", "measured": f"{name}", "setting": variant, "unit": "img/s",
               "H100 ceiling": ceiling(per_image)}
        estimate = 8.0 if quick else (120.0 if "compile" in variant else 25.0)
        r = measure_cell(rows, raw, f"{name} / {variant}", row, estimate, budget, device, f"generation: {name}, {variant}",
                         partial(generation_cell, unet, vq, latent, block, VARIANTS[variant], device, quick, 6.0))
        if r is None:
            continue
        rows.append({**row, "value": r["images_per_second"], "of ceiling": r["images_per_second"] / row["H100 ceiling"],
                     "note": f"batch {r['batch']}, {r['images']} images"})
    measured = [r for r in rows if r["measured"] == FAST and r.get("value")]
    best = max(measured, key=lambda r: r["value"]) if measured else None
    summary = {"fast_sampler": FAST, "best_fast_images_per_second": best["value"] if best else None,
               "best_fast_setting": best["setting"] if best else None}
    if best:
        rows.append({"section": "generation", "measured": f"{FAST}, best setting", "setting": best["setting"],
                     "value": best["value"], "unit": "img/s", "H100 ceiling": best["H100 ceiling"],
                     "of ceiling": best["of ceiling"], "target": f">= {TARGET_IMAGES_PER_SECOND:,.0f}",
                     "status": status(best["value"], TARGET_IMAGES_PER_SECOND, quick)})
    del unet, vq
    return rows, {"cells": raw, **summary}


def status(value: float | None, target: float, quick: bool) -> str:
    if quick:
        return "- (CPU, --quick)"
    if value is None:
        return "not measured"
    return "met" if value >= target else "MISSED"


# --- 2. pipeline -------------------------------------------------------------------------------------

def pipeline(device: torch.device, quick: bool, root: Path, budget: Budget) -> tuple[list[dict], dict]:
    """The ADMIS recipe through Ray Data with one generator actor (a GPU on a GPU machine); its busy fraction."""
    from common import start_ray, stop_ray, write_ldm_assets

    from synray.config import load_config
    from synray.config.synth import SynthConfig
    from synray.diffusion.schedule import linear_schedule
    from synray.models.ldm_checkpoint import save_unet_checkpoint
    from synray.synthesis.pipeline import run_synthesis

    row = {"section": "pipeline", "measured": "generator busy, 1 GPU actor", "setting": "bf16, UniPC 5", "unit": "fraction",
           "H100 ceiling": 1.0, "target": f">= {TARGET_BUSY:.0%}"}
    if not budget.allows(20.0 if quick else 90.0):
        return [{**row, "value": None, "note": "skipped: time budget"}], {}
    log("pipeline: writing the generator's files")
    root.mkdir(parents=True, exist_ok=True)
    if quick:
        over = [f"{k}={v}" for k, v in write_ldm_assets(root / "assets").items()]
        units, per_identity, unit_size = 3, 2, 4
    else:
        unet, vq, _ = generation_models(torch.device("cpu"), False)
        save_unet_checkpoint(unet, root / "unet.ckpt", linear_schedule())
        torch.save(vq.state_dict(), root / "vq_decoder.pt")
        del unet, vq
        over = [f"generator.unet={root / 'unet.ckpt'}", f"generator.vq_decoder={root / 'vq_decoder.pt'}",
                "generator.vq_config=null", "generator.latent_shape=[3,32,32]"]
        units, per_identity, unit_size = 12, 50, 64
    out = root / "pipeline_out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(ROOT / "conf" / "synth" / "admis.yaml", SynthConfig, [
        *over, f"output.uri={out}", "tracking.enabled=false", "ray.quiet=true", "contexts.source=gaussian",
        "contexts.path=null", "contexts.embedder=null", "quality.embedder=null", "augment.context_repeats=0",
        "generator.sampler={method: unipc, steps: 5}", f"generator.images_per_identity={per_identity}",
        f"identities.unit_size={unit_size}", f"identities.count={units * unit_size}", "alignment.mode=resize",
        f"generator.num_gpus={1 if device.type == 'cuda' else 0}", "generator.min_actors=1", "generator.max_actors=1",
        "generator.precision=auto" if device.type == "cuda" else "generator.precision=bf16"])
    start_ray(object_store_mb=768 if quick else 8192)
    try:
        log(f"pipeline: {units} units x {unit_size} identities x {per_identity} images through Ray Data")
        s = run_synthesis(cfg, progress=False)
    finally:
        stop_ray()
        shutil.rmtree(root, ignore_errors=True)
    busy = s["generator_seconds"] / s["seconds"]
    after = s["generator_seconds"] / max(s["generator_span_seconds"], 1e-9)
    res = {k: s[k] for k in ("images_written", "seconds", "images_per_second", "generator_seconds",
                             "generator_span_seconds", "generator_start_seconds", "drain_seconds")}
    res.update(busy=busy, busy_after_start=after)
    note = (f"{s['images_written']:,} images at {s['images_per_second']:.0f} img/s; busy {busy:.0%} of the whole run "
            f"(start-up {s['generator_start_seconds']:.1f} s, drain {s['drain_seconds']:.1f} s)")
    return [{**row, "value": after, "of ceiling": after, "note": note,
             "status": status(after, TARGET_BUSY, quick)}], res


# --- 3. IR-50 training -------------------------------------------------------------------------------

def ir50_cell(variant: dict, device: torch.device, quick: bool, seconds: float) -> dict:
    from synray.config.train import TrainConfig
    from synray.training.learner import Learner, TrainPlan

    if quick:
        backbone = {"name": "iresnet18", "kwargs": {"layers": [1, 1, 1, 1], "widths": [8, 16, 16, 32],
                                                    "embedding_dim": 64, "input_size": [32, 32]}}
        batch, classes, size, emb = 16, 100, 32, 64
    else:
        backbone, batch, classes, size, emb = {"name": "tface_ir50"}, 512, 10_000, 112, 512
    cfg = TrainConfig.model_validate({
        "data": {"train": "in-memory"}, "backbone": backbone, "head": {"name": "arcface", "kwargs": {"s": 64.0, "m": 0.5}},
        "batch_size": batch, "scaling": variant, "tracking": {"enabled": False}})
    plan = TrainPlan(train_rows=100 * batch, num_syn_classes=classes, num_real_classes=0, real_rows=0,
                     image_size=(size, size), embedding_size=emb, config_hash="gpu-benchmark")
    learner = Learner(cfg, plan, device=device)
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
            "label": torch.randint(0, classes, (batch,), generator=g).to(device),
            "label_b": torch.full((batch,), -1, dtype=torch.long, device=device),
            "weight_a": torch.ones(batch, device=device)}
    t0 = time.perf_counter()
    for k in range(3):
        learner.step(data, k, 0.1)
    sync(device)
    warm = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while steps < (2 if quick else 5) or (time.perf_counter() - t0 < seconds and steps < 200):
        learner.step(data, 3 + steps, 0.1)  # returns the loss as a float: one host sync per step, as in training
        steps += 1
    sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "seconds": dt, "images_per_second": steps * batch / dt, "warmup_seconds": warm,
            "classes": classes}


def ir50(device: torch.device, quick: bool, flops: dict, budget: Budget) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    variants = {"fp32": {"precision": "fp32", "channels_last": False},
                "bf16 + channels_last (CUDA default)": {"precision": "bf16", "channels_last": True},
                "bf16 + channels_last + compile": {"precision": "bf16", "channels_last": True, "compile": True}}
    if quick:
        variants.pop("bf16 + channels_last + compile")
    peak = ceiling(flops["ir50_train_step"])
    what = "tiny iresnet, batch 16, 100 classes" if quick else "TFace IR-50, batch 512, 10k classes"
    for name, v in variants.items():
        row = {"section": "IR-50 + ArcFace training", "measured": f"images/s ({what})", "setting": name,
               "unit": "img/s", "H100 ceiling": peak}
        estimate = 8.0 if quick else (90.0 if "compile" in name else 25.0)
        r = measure_cell(rows, raw, name, row, estimate, budget, device, f"IR-50 training: {name}",
                         partial(ir50_cell, v, device, quick, 0.5 if quick else 8.0))
        if r is None:
            continue
        rows.append({**row, "value": r["images_per_second"], "of ceiling": r["images_per_second"] / peak,
                     "note": f"{r['steps']} steps", "target": f">= {TARGET_IR50:,.0f}",
                     "status": status(r["images_per_second"], TARGET_IR50, quick)})
    return rows, raw


# --- 4. LDM training ---------------------------------------------------------------------------------

def ldm_cell(variant: dict, device: torch.device, quick: bool, seconds: float) -> dict:
    from synray.config.ldm import LDMConfig
    from synray.ldm.encode import LatentsInfo
    from synray.ldm.learner import LDMLearner

    batch = 8 if quick else 64
    latent = (3, 16, 16) if quick else LATENT
    arch = ({"initial_channels": 32, "channel_multipliers": [1, 2], "is_attention": [False, True],
             "n_blocks_per_resolution": 1, "context_channels": 32} if quick else {})
    cfg = LDMConfig.model_validate({
        "data": {"path": "in-memory"}, "vq": {"encoder": "e", "decoder": "d"}, "unet": {"architecture": arch},
        "training": {"batch_size": batch}, "scaling": variant, "tracking": {"enabled": False}})
    info = LatentsInfo(uri="in-memory", rows=100 * batch, latent_shape=latent, context_dim=CONTEXT_DIM, files=[],
                       first_stage="", vq_config={}, fingerprint="gpu-benchmark")
    learner = LDMLearner(cfg, info, device=device)
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((batch, *latent)).astype(np.float16)
    ctx = rng.standard_normal((batch, CONTEXT_DIM)).astype(np.float32)
    data = {"latent": [x.tobytes() for x in lat], "latent_flip": [x[..., ::-1].copy().tobytes() for x in lat],
            "context": [c.tobytes() for c in ctx]}
    t0 = time.perf_counter()
    for _ in range(2):
        learner.step(data)
    sync(device)
    warm = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while steps < (2 if quick else 5) or (time.perf_counter() - t0 < seconds and steps < 500):
        learner.step(data)
        steps += 1
    sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "seconds": dt, "steps_per_second": steps / dt,
            "latents_per_second": steps * batch / dt, "warmup_seconds": warm}


def ldm(device: torch.device, quick: bool, flops: dict, budget: Budget) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    batch = 8 if quick else 64
    peak = ceiling(flops["unet_train_step"] * batch)  # steps/s
    for name, v in {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"}}.items():
        row = {"section": "LDM training", "measured": f"steps/s (batch {batch})", "setting": name, "unit": "steps/s",
               "H100 ceiling": peak}
        r = measure_cell(rows, raw, name, row, 8.0 if quick else 25.0, budget, device, f"LDM training: {name}",
                         partial(ldm_cell, v, device, quick, 0.5 if quick else 6.0))
        if r is None:
            continue
        rows.append({**row, "value": r["steps_per_second"], "of ceiling": r["steps_per_second"] / peak,
                     "note": f"{r['latents_per_second']:.0f} latents/s"})
    return rows, raw


# --- main --------------------------------------------------------------------------------------------

def main() -> int:
    p = parser(__doc__)
    p.add_argument("--budget", type=float, default=330.0, help="seconds the whole run may take (default 330)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    p.add_argument("--pipeline", action="store_true", help="with --quick: also the (CPU) Ray Data pipeline")
    args = p.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    if not args.quick and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py measures a GPU and there is none here (torch {torch.__version__}, "
              "torch.cuda.is_available() is False): nothing measured. Run it on a machine with a CUDA GPU, or "
              "with --quick for its CPU-side checks.", file=sys.stderr)
        return 2
    setup(args)
    budget = Budget(args.budget)
    device = torch.device("cpu" if args.quick else "cuda")
    if args.quick:  # a shared CPU: more than one OpenMP thread can be 100x slower when the cores are busy
        torch.set_num_threads(1)
    info = machine()
    log("counting the published models' FLOPs (meta device)")
    flops = published_gflop()
    off = check_flops(flops)
    results: dict = {"device": gpu_info() if device.type == "cuda" else "cpu (--quick)", "gflop": flops,
                     "h100_tflops": H100_FLOPS / 1e12, "budget_seconds": args.budget}
    rows: list[dict] = []
    if "generation" in sections:
        r, results["generation"] = generation(device, args.quick, flops, budget)
        rows += r
    if "pipeline" in sections and (not args.quick or args.pipeline):
        r, results["pipeline"] = pipeline(device, args.quick, workdir(args, "gpu"), budget)
        rows += r
    if "ir50" in sections:
        r, results["ir50"] = ir50(device, args.quick, flops, budget)
        rows += r
    if "ldm" in sections:
        r, results["ldm"] = ldm(device, args.quick, flops, budget)
        rows += r
    results["rows"] = rows
    results["seconds"] = args.budget - budget.left()
    columns = ["section", "measured", "setting", "value", "unit", "H100 ceiling", "of ceiling", "target", "status", "note"]
    notes = [f"ceilings: published UNet {flops['unet_step']:.2f} GFLOP per step, VQ-f4 decode {flops['vq_decode']:.1f} "
             f"GFLOP per image, IR-50 {flops['ir50_forward']:.2f} GFLOP forward / {flops['ir50_train_step']:.1f} per "
             f"training image, UNet training {flops['unet_train_step']:.1f} GFLOP per latent, at "
             f"{H100_FLOPS / 1e12:.0f} TFLOP/s (100% MFU); 'of ceiling' is the MFU on an H100",
             "generation: LDMGenerator.generate end to end (x_T, sampler, decode on a side stream, uint8 images on the "
             "host), random weights, batch auto; fp32 leaves PyTorch's defaults (TF32 convolutions)"]
    if args.quick:
        notes.append("--quick: CPU, scaled-down models (small UNet and decoder, tiny iresnet, small LDM UNet), no "
                     "torch.compile, no Ray pipeline (add --pipeline): checks the code paths, not GPU figures")
    if off:
        notes.append("FLOP counts disagree with the anchors: " + "; ".join(off))
    finish("gpu", args, info, results, [table(rows, columns)], notes)
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
