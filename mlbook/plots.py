"""Figures the chapters share (matplotlib only; each returns its Axes).

Chapters may add functions here; keep each small and named after what it shows.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

__all__ = ["sinusoid_fits", "learning_curves", "smooth"]


def smooth(values, window: int = 100) -> torch.Tensor:
    """Moving average over ``window`` points (for noisy meta-loss curves)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    window = max(1, min(window, v.numel()))
    kernel = torch.ones(1, 1, window, dtype=torch.float64) / window
    return torch.nn.functional.conv1d(v[None, None], kernel)[0, 0]


def sinusoid_fits(
    learner, batch, steps=(0, 1, 10), task: int = 0, ax=None, grid: int = 200
):
    """The true sine of one task, its support points, and the learner's fit
    after each number of SGD steps in ``steps`` (``batch`` is a TaskBatch from
    ``mlbook.tasks.Sinusoid``). Introduced in ``book/01_learning_to_learn``."""
    ax = ax or plt.gca()
    one = batch.task(task)
    device = next(learner.model.parameters()).device
    x = torch.linspace(-5, 5, grid, device=device)[:, None]  # [grid, 1]
    amp, phase = one.info["amplitude"][0], one.info["phase"][0]
    ax.plot(x.cpu(), (amp * torch.sin(x - phase)).cpu(), "k--", lw=1.5, label="true")
    xs, ys = one.x_support[0].to(device), one.y_support[0].to(device)
    with torch.no_grad():
        fast, done = None, 0
        for s in sorted(steps):
            if s > done:
                fast = learner.adapt(xs, ys, steps=s - done, params=fast)
                done = s
            y = learner.predict(fast if fast is not None else learner.params(), x)
            ax.plot(x.cpu(), y.cpu(), lw=1.5, label=f"{s} step{'s' * (s != 1)}")
    ax.scatter(xs.cpu(), ys.cpu(), c="k", s=25, zorder=3, label="support")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    return ax


def learning_curves(curves: dict, window: int = 100, ax=None, log: bool = True):
    """Smoothed loss curves ``{label: losses}`` against meta-iteration."""
    ax = ax or plt.gca()
    for label, losses in curves.items():
        s = smooth(losses, window)
        ax.plot(torch.arange(len(s)) + window, s, label=label)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"loss (moving average of {window})")
    if log:
        ax.set_yscale("log")
    ax.legend()
    return ax


def compare_fits(
    learners: dict,
    batch,
    steps: int = 1,
    inner_lr=None,
    task: int = 0,
    ax=None,
    grid: int = 200,
):
    """One sinusoid task's true curve, its support points, and the fit of each
    learner in ``{label: learner}`` after ``steps`` SGD steps on the support
    set, with learning rate ``inner_lr`` (default: each learner's own). The
    legend gives each fit's MSE to the true curve on a dense grid. Introduced
    in ``book/02_meta_vs_transfer``."""
    import copy

    ax = ax or plt.gca()
    one = batch.task(task)
    amp, phase = one.info["amplitude"][0], one.info["phase"][0]
    x = torch.linspace(-5, 5, grid)[:, None]  # [grid, 1]
    truth = amp * torch.sin(x - phase)  # [grid, 1]
    ax.plot(x, truth, "k--", lw=1.5, label="true")
    for label, learner in learners.items():
        tuned = copy.copy(learner)  # shares the model; only inner_lr differs
        if inner_lr is not None:
            tuned.inner_lr = inner_lr
        device = next(learner.model.parameters()).device
        xs, ys = one.x_support[0].to(device), one.y_support[0].to(device)
        with torch.no_grad():
            params = tuned.adapt(xs, ys, steps=steps) if steps else tuned.params()
            y = tuned.predict(params, x.to(device)).cpu()
        mse = torch.mean((y - truth) ** 2).item()
        ax.plot(x, y, lw=1.5, label=f"{label} (MSE {mse:.2f})")
    ax.scatter(
        one.x_support[0].cpu(),
        one.y_support[0].cpu(),
        c="k",
        s=25,
        zorder=3,
        label="support",
    )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    return ax
