"""Regenerate ``unipc_golden.pt`` with diffusers' ``UniPCMultistepScheduler`` (not run by the tests).

Needs diffusers and torch in an environment of their own (diffusers is not a synray dependency):

    python -m venv /tmp/dvenv && /tmp/dvenv/bin/pip install torch diffusers
    /tmp/dvenv/bin/python tests/data/make_unipc_golden.py tests/data/unipc_golden.pt

The eps-model is exact for a small context-conditioned Gaussian mixture (``toy_eps`` below; the test
rebuilds it from the stored parameters), so every trajectory is a deterministic function of the file.
"""

from __future__ import annotations

import sys

import diffusers
import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

T, BETA_START, BETA_END = 1000, 1e-4, 0.02
CASES = [  # (name, steps, order, variant, spacing, guidance)
    ("bh2_o3_time_uniform_5", 5, 3, "bh2", "time_uniform", None),
    ("bh2_o2_time_uniform_5_guided", 5, 2, "bh2", "time_uniform", 2.0),
    ("bh1_o3_time_uniform_6", 6, 3, "bh1", "time_uniform", None),
    ("bh2_o3_logsnr_4", 4, 3, "bh2", "logsnr", None),
    ("bh1_o3_logsnr_5_guided", 5, 3, "bh1", "logsnr", 1.5),
    ("bh2_o1_time_uniform_5", 5, 1, "bh2", "time_uniform", None),
    ("bh2_o3_time_uniform_12", 12, 3, "bh2", "time_uniform", None),
]


def toy_eps(params: dict, alphas_cumprod: torch.Tensor):
    """Exact E[eps | x_t, c] for data ~ sum_k w_k N(mu_k + c A, s_k^2 I); no context: c A = 0."""
    mu, s2 = params["means"], params["stds"] ** 2
    logw, A = params["weights"].log(), params["shift"]

    def model(x: torch.Tensor, t: int, context: torch.Tensor | None) -> torch.Tensor:
        a = alphas_cumprod[t].double()
        shift = context @ A if context is not None else torch.zeros_like(x)
        means = mu[None] + shift[:, None]  # [B, K, D]
        var = a * s2 + (1 - a)  # [K]
        diff = x[:, None, :] - a.sqrt() * means
        logp = logw - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * x.shape[1] * var.log()
        resp = torch.softmax(logp, dim=-1)
        return (1 - a).sqrt() * (resp[:, :, None] * diff / var[:, None]).sum(1)

    return model


def logsnr_timesteps(sched: UniPCMultistepScheduler, steps: int) -> list[int]:
    """First `steps` of `steps + 1` points uniform in log-SNR between t = T-1 and t = 0, nearest timestep."""
    lam = sched.lambda_t.double().numpy()
    targets = np.linspace(lam[-1], lam[0], steps + 1)[:-1]
    return [int(np.argmin(np.abs(lam - v))) for v in targets]


def run_case(params, steps, order, variant, spacing, guidance):
    sched = UniPCMultistepScheduler(num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
                                    beta_schedule="linear", solver_order=order, solver_type=variant,
                                    prediction_type="epsilon", predict_x0=True, lower_order_final=True,
                                    timestep_spacing="linspace", final_sigmas_type="zero")
    sched.set_timesteps(steps)
    if spacing == "logsnr":
        ts = logsnr_timesteps(sched, steps)
        ac = sched.alphas_cumprod
        sched.timesteps = torch.tensor(ts, dtype=torch.int64)
        sched.sigmas = torch.tensor([float(((1 - ac[t]) / ac[t]) ** 0.5) for t in ts] + [0.0], dtype=torch.float32)
        sched.num_inference_steps = len(ts)
    model = toy_eps(params, sched.alphas_cumprod)
    x, ctx = params["x_T"].clone(), params["context"]
    traj = []
    for t in sched.timesteps.tolist():
        eps = model(x, t, ctx)
        if guidance is not None:  # IDiff-Face rule, w*c - (w-1)*u
            eps = guidance * eps - (guidance - 1) * model(x, t, None)
        x = sched.step(eps, t, x).prev_sample
        traj.append(x)
    # The last step goes to sigma = 0 and returns the data prediction at the last timestep; with bh1 diffusers
    # computes it as m0 - (-inf) * 0 = NaN, so the golden stores that data prediction itself.
    final = sched.model_outputs[-1].clone()
    if variant == "bh2":
        torch.testing.assert_close(traj[-1], final, rtol=0, atol=0)
    return {"steps": steps, "order": order, "variant": variant, "spacing": spacing, "guidance": guidance,
            "timesteps": sched.timesteps.tolist(), "x_traj": torch.stack(traj[:-1]), "x_final": final}


def main(path: str) -> None:
    g = torch.Generator().manual_seed(20240607)
    K, D, C, B = 3, 4, 5, 6
    params = {
        "means": 1.5 * torch.randn(K, D, generator=g, dtype=torch.float64),
        "stds": torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64),
        "weights": torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
        "shift": 0.5 * torch.randn(C, D, generator=g, dtype=torch.float64),
        "context": torch.randn(B, C, generator=g, dtype=torch.float64),
        "x_T": torch.randn(B, D, generator=g, dtype=torch.float64),
    }
    cases = {name: run_case(params, *rest) for name, *rest in CASES}
    golden = {
        "source": f"diffusers {diffusers.__version__} UniPCMultistepScheduler, torch {torch.__version__}",
        "schedule": {"T": T, "beta_start": BETA_START, "beta_end": BETA_END},
        "model": params,
        "cases": cases,
        # diffusers keeps sigmas in float32 and alpha_bar as a cumprod; synray works in float64 from
        # exp(cumsum(log alpha)) (see synray.diffusion.schedule), so trajectories agree to ~1e-6 relative
        "atol_rel_to_max": 1e-5,
    }
    torch.save(golden, path)
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "unipc_golden.pt")
