"""The DirectPred / IsoLoss theory on a linear network (Tian, Chen & Ganguli 2021; Halvagal, Laborieux & Zenke
2023), measured: eigenvalues of the embedding correlation against training steps for BYOL, DirectPred and
IsoLoss, beside the learning rate per eigenmode the analysis predicts.

Model: x ~ N(0, diag(sigma^2)) in R^8 (sigma^2 from 1 down to 0.01), two views x + e, e ~ N(0, 0.1^2 I); an
online linear network z = W x (8 outputs; SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 256), a target
network W_a = EMA of W, and the predictor p = W_P z. For the cosine loss the gradient reaching z is W_P^T dL/dp,
so in the eigenbasis u_m of the correlation C = E[z z^T] the update of mode m is scaled by lambda_m = u_m^T W_P u_m:
  DirectPred: W_P = U diag((s / s_max + eps)^alpha) U^T, so lambda_m = (s_m / s_max + eps)^alpha: weak modes learn
              slowly (alpha = 0.5, eps = 0.1, as the recipes);
  IsoLoss:    the BYOL gradient w.r.t. p applied to z directly: lambda_m = 1 for every mode;
  BYOL:       W_P learned; lambda_m is whatever it has learned (measured, no closed form); with this data its
              weakest modes decay (dimensional collapse), so their rise is not compared.
Measured per mode: the effective learning rate r_m = E|u_m^T dL/dz| / E|u_m^T dL/dp| (the ratio of the gradient
that reaches z to the BYOL gradient w.r.t. the prediction, along u_m), and the step at which s_m first reaches
half of its final value. The dynamic consequence the analysis predicts: mode m reaches it later under DirectPred
than under IsoLoss by about 1 / lambda_m (the same seed: the same data, noise and initial weights). The losses and
the DirectPred predictor are hssl's own (hssl_cli.losses, hssl_cli.methods.directpred), the code the image recipes
train with.

    .venv/bin/python scripts/eigenmode_dynamics.py --out docs/figures/eigenmode_dynamics.png --seeds 5
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from hssl_cli.losses import byol_cosine, iso_loss
from hssl_cli.methods.byol import target_momentum
from hssl_cli.methods.directpred import CorrelationPredictor

METHODS = ("byol", "directpred", "isoloss")


def run(method: str, seed: int, steps: int, inputs: int = 8, outputs: int = 8, batch: int = 256,
        lr: float = 0.05, weight_decay: float = 5e-4, noise: float = 0.1, record_every: int = 2) -> dict:
    """One training run; returns the recorded eigenvalues (steps x d), the per-mode rates and lambdas."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, inputs).sqrt()  # sigma_i: variances from 1 down to 0.01
    online = torch.randn(outputs, inputs, generator=generator) * 0.1
    online.requires_grad_(True)
    target = online.detach().clone()
    learned = (torch.eye(outputs) + 0.01 * torch.randn(outputs, outputs, generator=generator)).requires_grad_(True)
    predictor = CorrelationPredictor(outputs, alpha=0.5, eps=0.1, rho=0.99)
    parameters = [online] + ([learned] if method == "byol" else [])
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    evaluation = torch.randn(4096, inputs, generator=generator) * scales
    recorded = {"step": [], "eigenvalues": [], "rates": [], "lambdas": []}
    for step in range(steps + 1):
        x = torch.randn(batch, inputs, generator=generator) * scales
        views = [x + noise * torch.randn(batch, inputs, generator=generator) for _ in range(2)]
        z = torch.cat(views) @ online.T
        z.retain_grad()
        with torch.no_grad():
            targets = torch.cat(views) @ target.T
        if method == "byol":
            weight = learned
            p = z @ weight.T
        else:
            predictor.update(z)
            weight = predictor.weight()
            p = z @ weight  # W_P symmetric
        p.retain_grad()
        z1, z2 = z.chunk(2)
        t1, t2 = targets.chunk(2)
        if method == "isoloss":
            loss = iso_loss(z1, t2, weight) + iso_loss(z2, t1, weight)
            with torch.no_grad():  # the BYOL gradient w.r.t. p, for the ratio r_m
                prediction = p.detach().requires_grad_(True)
                with torch.enable_grad():
                    q1, q2 = prediction.chunk(2)
                    (byol_cosine(q1, t2) + byol_cosine(q2, t1)).backward()
                gradient_p = prediction.grad
        else:
            p1, p2 = p.chunk(2)
            loss = byol_cosine(p1, t2) + byol_cosine(p2, t1)
        optimizer.zero_grad()
        loss.backward()
        if method != "isoloss":
            gradient_p = p.grad
        if step % record_every == 0:
            with torch.no_grad():
                embedded = evaluation @ online.T
                eigenvalues, eigenvectors = torch.linalg.eigh(embedded.T @ embedded / len(embedded))
                eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
                along_z = (z.grad @ eigenvectors).abs().mean(0)
                along_p = (gradient_p @ eigenvectors).abs().mean(0).clamp_min(1e-12)
                lambdas = torch.einsum("im,ij,jm->m", eigenvectors, weight.detach(), eigenvectors)
            recorded["step"].append(step)
            recorded["eigenvalues"].append(eigenvalues.tolist())
            recorded["rates"].append((along_z / along_p).tolist())
            recorded["lambdas"].append(lambdas.tolist())
        optimizer.step()
        with torch.no_grad():  # target <- tau target + (1 - tau) online
            tau = target_momentum(step / steps, 0.99)
            target.lerp_(online.detach(), 1 - tau)
    return recorded


def half_rise_steps(recorded: dict) -> list[float]:
    """Per mode: the first recorded step at which s_m reaches half of its final value."""
    eigenvalues = torch.tensor(recorded["eigenvalues"])
    start, final = eigenvalues[0], eigenvalues[-1]
    steps = []
    for mode in range(eigenvalues.shape[1]):
        halfway = start[mode] + 0.5 * (final[mode] - start[mode])
        reached = ((eigenvalues[:, mode] - halfway) * torch.sign(final[mode] - start[mode]) >= 0).nonzero()
        steps.append(float(recorded["step"][int(reached[0])]) if len(reached) else math.nan)
    return steps


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per method: the mean over seeds of r_m and lambda_m in the second half of training (mode m by eigenvalue
    rank, largest first), and per mode the half-rise step divided by IsoLoss's for the same seed (mean ± std)."""
    summary = {}
    for method, seeded in runs.items():
        rates, lambdas, ratios = [], [], []
        for recorded, isoloss in zip(seeded, runs["isoloss"], strict=True):
            later = len(recorded["rates"]) // 2
            rates.append(torch.tensor(recorded["rates"][later:]).mean(0))
            lambdas.append(torch.tensor(recorded["lambdas"][later:]).mean(0))
            mine, reference = half_rise_steps(recorded), half_rise_steps(isoloss)
            ratios.append([a / b if b > 0 else math.nan for a, b in zip(mine, reference, strict=True)])
        rate, lam = torch.stack(rates).mean(0), torch.stack(lambdas).mean(0)
        by_mode = list(zip(*ratios, strict=True))
        summary[method] = {
            "rate_by_mode": [round(v, 3) for v in rate.tolist()],
            "lambda_by_mode": [round(v, 3) for v in lam.tolist()],
            "rate_spread": round(float(rate.max() / rate.min()), 2),
            "rise_ratio_mean": [round(statistics.fmean(m), 2) for m in by_mode],
            "rise_ratio_std": [round(statistics.stdev(m), 2) if len(m) > 1 else 0.0 for m in by_mode],
            "seeds": len(seeded),
        }
    return summary


def plot(runs: dict[str, list[dict]], summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 3.6), layout="constrained")
    axes = figure.subplots(1, 5)
    titles = {"byol": "BYOL (learned W_P)", "directpred": "DirectPred", "isoloss": "IsoLoss"}
    for axis, method in zip(axes[:3], METHODS, strict=True):
        recorded = runs[method][0]
        eigenvalues = torch.tensor(recorded["eigenvalues"])
        for mode in range(eigenvalues.shape[1]):
            axis.plot(recorded["step"], eigenvalues[:, mode], color=f"C{mode % 10}", lw=1)
        axis.set_yscale("log")
        axis.set_title(f"{titles[method]}: eigenvalues of C", fontsize=9)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
    axis = axes[3]
    for number, method in enumerate(METHODS):
        rates = summary[method]["rate_by_mode"]
        modes = range(1, len(rates) + 1)
        axis.plot(modes, rates, "o-", color=f"C{number}", label=f"{titles[method]}: measured r_m", ms=4)
        if method == "directpred":
            axis.plot(modes, summary[method]["lambda_by_mode"], "k--", lw=1,
                      label="DirectPred predicted (s_m/s_max + eps)^alpha")
    axis.axhline(1.0, color="C2", ls=":", lw=1, label="IsoLoss predicted: 1 for every mode")
    axis.set_xlabel("mode m (by eigenvalue, largest first)")
    axis.set_ylabel("learning rate of mode m (relative)")
    axis.set_title("learning rate per eigenmode", fontsize=9)
    axis.legend(fontsize=6)
    axis.grid(True, alpha=0.3)
    axis = axes[4]
    modes = range(1, len(summary["directpred"]["rise_ratio_mean"]) + 1)
    axis.errorbar(modes, summary["directpred"]["rise_ratio_mean"], yerr=summary["directpred"]["rise_ratio_std"],
                  fmt="o-", color="C1", ms=4, capsize=2, label="DirectPred / IsoLoss, measured")
    axis.plot(modes, [1 / v for v in summary["directpred"]["lambda_by_mode"]], "k--", lw=1,
              label="DirectPred predicted: 1 / lambda_m")
    axis.axhline(1.0, color="C2", ls=":", lw=1)
    axis.set_xlabel("mode m (by eigenvalue, largest first)")
    axis.set_ylabel("steps to half the final eigenvalue, / IsoLoss's")
    axis.set_title(f"how late each mode rises (mean ± std, {len(runs['isoloss'])} seeds)", fontsize=9)
    axis.legend(fontsize=6)
    axis.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/eigenmode_dynamics.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    runs = {method: [run(method, seed, arguments.steps) for seed in range(arguments.seeds)] for method in METHODS}
    summary = summarise(runs)
    plot(runs, summary, arguments.out)
    print(f"Mode m by eigenvalue, largest first; means over {arguments.seeds} seeds.\n")
    print("| method | learning rate r_m of mode 1..8 | predicted | steps to half the final eigenvalue, / IsoLoss's |")
    print("| --- | --- | --- | --- |")
    predicted = {"byol": "none (W_P learned)", "isoloss": "1 for every mode",
                 "directpred": ", ".join(f"{v:.2f}" for v in summary["directpred"]["lambda_by_mode"])}
    for method, row in summary.items():
        rise = "- (its weak modes decay: no half-rise)" if method == "byol" else ", ".join(
            f"{m:.2f} ± {s:.2f}" for m, s in zip(row["rise_ratio_mean"], row["rise_ratio_std"], strict=True))
        print(f"| {method} | {', '.join(f'{v:.2f}' for v in row['rate_by_mode'])} | {predicted[method]} | {rise} |")
    print("\nDirectPred predicted rise ratio 1 / lambda_m: "
          + ", ".join(f"{1 / v:.2f}" for v in summary["directpred"]["lambda_by_mode"]))
    print(f"figure: {arguments.out}")
    if arguments.json:
        arguments.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
