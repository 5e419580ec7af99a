"""Task distributions and the `TaskBatch` they produce.

A *task* is a small supervised problem: a support set to adapt on and a query
set to judge the adapted model on. A *task distribution* p(T) samples many of
them; meta-learning learns what the tasks share. Introduced in the chapter
"Tasks, support and query sets, inner and outer loops" (``book/03_tasks``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

__all__ = ["TaskBatch", "Sinusoid"]


@dataclass
class TaskBatch:
    """Support and query tensors for ``T`` tasks, stacked on a leading dim.

    Shapes: ``x_support [T, K, ...]``, ``y_support [T, K, ...]``,
    ``x_query [T, Q, ...]``, ``y_query [T, Q, ...]``. ``info`` carries optional
    per-task metadata (for the sinusoid: ``amplitude`` and ``phase``, both [T]).
    Introduced in ``book/03_tasks``.
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        names = ("x_support", "y_support", "x_query", "y_query")
        for name in names:
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor")
            if getattr(self, name).dim() < 2:
                raise ValueError(
                    f"TaskBatch.{name} must be [tasks, points, ...], got shape "
                    f"{tuple(getattr(self, name).shape)}"
                )
        xs, ys, xq, yq = (getattr(self, n) for n in names)
        if len({xs.shape[0], ys.shape[0], xq.shape[0], yq.shape[0]}) != 1:
            raise ValueError(
                "TaskBatch tensors disagree on the number of tasks (dim 0): "
                f"x_support {tuple(xs.shape)}, y_support {tuple(ys.shape)}, "
                f"x_query {tuple(xq.shape)}, y_query {tuple(yq.shape)}"
            )
        if xs.shape[0] == 0:
            raise ValueError("TaskBatch holds no tasks (dim 0 of every tensor is 0)")
        if xs.shape[1] == 0:
            raise ValueError("TaskBatch.x_support is empty: need at least one point")
        if xs.shape[:2] != ys.shape[:2] or xq.shape[:2] != yq.shape[:2]:
            raise ValueError(
                "x and y must have the same [tasks, points] leading dims: "
                f"support {tuple(xs.shape)} vs {tuple(ys.shape)}, "
                f"query {tuple(xq.shape)} vs {tuple(yq.shape)}"
            )
        if xs.shape[2:] != xq.shape[2:] or ys.shape[2:] != yq.shape[2:]:
            raise ValueError(
                "support and query examples must have the same shape: "
                f"x {tuple(xs.shape[2:])} vs {tuple(xq.shape[2:])}, "
                f"y {tuple(ys.shape[2:])} vs {tuple(yq.shape[2:])}"
            )

    @property
    def num_tasks(self) -> int:
        """How many tasks the batch holds (the size of dim 0)."""
        return self.x_support.shape[0]

    def to(self, device) -> TaskBatch:
        """A copy with every tensor (including ``info`` tensors) on ``device``."""
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return TaskBatch(
            move(self.x_support),
            move(self.y_support),
            move(self.x_query),
            move(self.y_query),
            {k: move(v) for k, v in self.info.items()},
        )

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` as a batch of one (keeps the leading dim); ``-1`` is the
        last task."""
        n = self.num_tasks
        try:  # an int, or an integer scalar from numpy or torch
            k = None if isinstance(i, bool) else operator.index(i)
        except TypeError:
            k = None
        if k is None or not -n <= k < n:
            raise IndexError(f"task {i!r} of a batch of {n} tasks")
        i = k % n
        return self.tasks(slice(i, i + 1))

    def tasks(self, s: slice) -> TaskBatch:
        """The tasks ``s`` (a slice of the leading dim) as a batch."""
        if not isinstance(s, slice):
            raise TypeError(f"tasks() takes a slice, got {type(s).__name__}")
        pick = lambda v: v[s] if isinstance(v, torch.Tensor) else v  # noqa: E731
        return TaskBatch(
            pick(self.x_support),
            pick(self.y_support),
            pick(self.x_query),
            pick(self.y_query),
            {k: pick(v) for k, v in self.info.items()},
        )


def _uniform(low, high, shape, generator):
    # One draw from U[low, high); on the CPU so a CPU generator always works and
    # the same seed gives the same tasks on every device.
    return low + (high - low) * torch.rand(shape, generator=generator)


def _check_counts(num_tasks, k_support, k_query):
    for name, value, least in (
        ("num_tasks", num_tasks, 1),
        ("k_support", k_support, 1),
        ("k_query", k_query, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


@dataclass
class Sinusoid:
    """The sinusoid regression tasks of the MAML paper (Finn et al., 2017).

    Each task is ``y = amplitude * sin(x - phase)`` with amplitude ~ U[0.1, 5],
    phase ~ U[0, pi] and inputs x ~ U[-5, 5]; every range can be overridden.
    Introduced in ``book/01_learning_to_learn`` and used throughout the book.
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self):
        for name in ("amplitude", "phase", "x_range"):
            value = getattr(self, name)
            ok = isinstance(value, (tuple, list)) and len(value) == 2
            if not ok or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in value
            ):
                raise ValueError(
                    f"Sinusoid.{name} must be a (low, high) pair of finite "
                    f"numbers, got {value!r}"
                )
            low, high = value
            if not low <= high:
                raise ValueError(
                    f"Sinusoid.{name} must be (low, high) with low <= high"
                )

    @staticmethod
    def function(x, amplitude, phase):
        """y = A sin(x - phase), broadcasting task parameters over points."""
        return amplitude * torch.sin(x - phase)

    def sample_params(self, num_tasks: int, generator=None):
        """Amplitudes and phases of ``num_tasks`` new tasks, each [T]."""
        _check_counts(num_tasks, 1, 0)
        amp = _uniform(*self.amplitude, (num_tasks,), generator)
        phase = _uniform(*self.phase, (num_tasks,), generator)
        return amp, phase

    def make_batch(
        self, amplitude, phase, k_support, k_query, generator=None, device=None
    ) -> TaskBatch:
        """Fresh support/query points for tasks with the given parameters."""
        amplitude = torch.as_tensor(amplitude, dtype=torch.float32).reshape(-1)
        phase = torch.as_tensor(phase, dtype=torch.float32).reshape(-1)
        num_tasks = amplitude.numel()
        if phase.numel() != num_tasks:
            raise ValueError(
                f"{num_tasks} amplitudes but {phase.numel()} phases: one of each "
                "per task"
            )
        _check_counts(num_tasks, k_support, k_query)
        x = _uniform(*self.x_range, (num_tasks, k_support + k_query, 1), generator)
        y = self.function(
            x, amplitude[:, None, None], phase[:, None, None]
        )  # [T, K+Q, 1]
        batch = TaskBatch(
            x[:, :k_support],
            y[:, :k_support],
            x[:, k_support:],
            y[:, k_support:],
            {"amplitude": amplitude, "phase": phase},
        )
        return batch.to(device) if device is not None else batch

    def sample(
        self, num_tasks: int, k_support: int, k_query: int, generator=None, device=None
    ) -> TaskBatch:
        """``num_tasks`` new tasks with ``k_support`` + ``k_query`` points each."""
        _check_counts(num_tasks, k_support, k_query)
        amp, phase = self.sample_params(num_tasks, generator)
        return self.make_batch(amp, phase, k_support, k_query, generator, device)
