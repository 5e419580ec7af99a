"""Figures the chapters share (matplotlib only; each returns its Axes).

Chapters may add functions here; keep each small and named after what it shows.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

__all__ = ["sinusoid_fits", "learning_curves", "smooth"]


def smooth(values, window: int = 100) -> torch.Tensor:
    """Moving average over ``window`` points (for noisy meta-loss curves), as
    the curves of ``book/04_maml`` and ``book/06_reptile`` take it."""
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
    """Smoothed loss curves ``{label: losses}`` against meta-iteration; each
    point is the mean of the ``window`` iterations that end there (of all of
    them, for a curve shorter than ``window``). Introduced in
    ``book/02_meta_vs_transfer``."""
    ax = ax or plt.gca()
    used = set()
    for label, losses in curves.items():
        n = len(losses)
        if n == 0:
            raise ValueError(f"no losses to plot for {label!r}")
        w = max(1, min(window, n))
        used.add(w)
        s = smooth(losses, w)
        ax.plot(torch.arange(len(s)) + w, s, label=label)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"loss (moving average of {'/'.join(map(str, sorted(used)))})")
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


def mean_curve(
    steps,
    mean,
    ci=None,
    diverged=None,
    top=None,
    ax=None,
    errorbar: bool = False,
    label=None,
    color=None,
):
    """A mean metric against adaptation steps, with its 95% interval as a band
    (or, with ``errorbar=True``, as error bars), from an ``EvalResult``
    (``ev.steps, ev.mean, ev.ci95, ev.diverged``) or a record's ``eval``
    entry. Tasks whose loss became NaN or infinite are left out of the mean;
    a step where ``n`` of them were left out is labelled "n div.". A mean above
    ``top`` (one task whose adaptation is blowing up can dominate a mean while
    its loss is still finite) is drawn as a triangle at ``top``, and the
    y-axis ends there. Introduced in ``book/02_meta_vs_transfer``."""
    import math

    ax = ax or plt.gca()
    steps = list(steps)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    ci = torch.zeros_like(mean) if ci is None else torch.as_tensor(ci).double()
    over = mean > (math.inf if top is None else top)
    shown = mean.masked_fill(over, math.nan)  # a gap where the mean is off the scale
    if errorbar:
        bars = ax.errorbar(steps, shown, yerr=ci.masked_fill(over, math.nan), fmt="o",
                           ms=3, capsize=2, color=color, label=label)
        color = bars[0].get_color()
    else:
        (line,) = ax.plot(steps, shown, marker="o", ms=3, color=color, label=label)
        color = line.get_color()
        ax.fill_between(steps, shown - ci, shown + ci, color=color, alpha=0.2)
    if over.any():
        xs = [s for s, o in zip(steps, over.tolist()) if o]
        ax.plot(xs, [top] * len(xs), "^", ms=8, color=color, clip_on=False)
        low = ax.get_ylim()[0]
        ax.set_ylim(low, top)
    for s, m, d in zip(steps, mean.tolist(), diverged or []):
        if d:
            y = top if top is not None and m > top else m
            ax.annotate(f"{d} div.", (s, y), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=7, color=color)
    return ax
