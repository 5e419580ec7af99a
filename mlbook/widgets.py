"""ipywidgets controls the chapters use. Every widget has a static figure of
its default state beside it in the book, since the HTML page has no kernel.

Chapters may add functions here; each returns the widget it builds.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from .plots import sinusoid_fits
from .tasks import Sinusoid

__all__ = ["sinusoid_adaptation"]


def sinusoid_adaptation(learner, seed: int = 0, k_support: int = 10):
    """Sliders for a new task's amplitude and phase, the number of support
    points and of SGD steps; redraws the learner's fit. Introduced in
    ``book/01_learning_to_learn``."""
    dist = Sinusoid()

    def draw(amplitude=2.5, phase=1.0, k_support=k_support, steps=1):
        g = torch.Generator().manual_seed(seed)
        batch = dist.make_batch([amplitude], [phase], k_support, 0, generator=g)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sinusoid_fits(learner, batch, steps=sorted({0, steps}), ax=ax)
        ax.set_ylim(-6, 6)
        plt.show()

    return widgets.interactive(
        draw,
        amplitude=widgets.FloatSlider(value=2.5, min=0.1, max=5.0, step=0.1),
        phase=widgets.FloatSlider(value=1.0, min=0.0, max=3.14, step=0.05),
        k_support=widgets.IntSlider(value=k_support, min=1, max=40),
        steps=widgets.IntSlider(value=1, min=0, max=20),
    )


def compare_adaptation(learners: dict, seed: int = 0, k_support: int = 10):
    """Sliders for a new task's amplitude and phase, the number of SGD steps
    and the fine-tuning learning rate; redraws every learner's fit in
    ``{label: learner}`` on that task (``mlbook.plots.compare_fits``).
    Introduced in ``book/02_meta_vs_transfer``."""
    from .plots import compare_fits

    dist = Sinusoid()

    def draw(amplitude=2.5, phase=1.0, steps=1, inner_lr=0.01):
        g = torch.Generator().manual_seed(seed)
        batch = dist.make_batch([amplitude], [phase], k_support, 0, generator=g)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        compare_fits(learners, batch, steps=steps, inner_lr=inner_lr, ax=ax)
        ax.set_ylim(-6, 6)
        ax.set_title(f"{steps} step{'s' * (steps != 1)}, inner_lr = {inner_lr:.3g}")
        plt.show()

    return widgets.interactive(
        draw,
        amplitude=widgets.FloatSlider(value=2.5, min=0.1, max=5.0, step=0.1),
        phase=widgets.FloatSlider(value=1.0, min=0.0, max=3.14, step=0.05),
        steps=widgets.IntSlider(value=1, min=0, max=20),
        inner_lr=widgets.FloatLogSlider(value=0.01, base=10, min=-3, max=-1.3,
                                        step=0.05),
    )
