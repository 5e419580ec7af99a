"""The functional inner loop that MAML, Reptile and the transfer baseline share.

Adaptation never touches the module: it reads the module's parameters as a
dict, takes SGD steps on copies, and returns the new dict. Each step is

    theta'  <-  theta' - inner_lr * grad_theta' L_support(f_theta')

written with ``torch.func`` so that one task and a batch of tasks run the same
code (``vmap`` over the task dim) and the steps stay differentiable for the
outer loop. Introduced in ``book/03_tasks`` and ``book/04_maml``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = ["InnerLoop"]

# How many dims one example has, read off the first layer that fixes it.
_EXAMPLE_DIMS = {nn.Linear: 1, nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}


def _positive(name, value, kind=float, allow_zero=False):
    ok = isinstance(value, (int, float) if kind is float else int)
    ok = ok and not isinstance(value, bool)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a {kind.__name__} {bound}, got {value!r}")
    return value


def _example_dims(model: nn.Module):
    for module in model.modules():
        for cls, dims in _EXAMPLE_DIMS.items():
            if isinstance(module, cls):
                return dims
    return None


class InnerLoop:
    """SGD adaptation of a plain ``nn.Module`` on one task or a batch of tasks.

    ``example_dims`` is how many dims one input example has (1 for vectors,
    3 for images ``[C, H, W]``); it is read off the model's first Linear/Conv
    layer when not given, and tells ``[K, ...]`` (one task) from ``[T, K, ...]``.
    """

    def __init__(self, model: nn.Module, loss_fn, inner_lr: float, inner_steps: int = 1,
                 first_order: bool = False, example_dims: int | None = None,
                 check_finite: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(prediction, target)")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to adapt")
        self.model = model
        self.loss_fn = loss_fn
        self.inner_lr = _positive("inner_lr", inner_lr)
        self.inner_steps = _positive("inner_steps", inner_steps, int, allow_zero=True)
        self.first_order = bool(first_order)
        self.example_dims = example_dims if example_dims is not None else _example_dims(model)
        self.check_finite = check_finite

    # -- parameters -----------------------------------------------------------
    def params(self) -> dict:
        """The model's parameters as ``{name: tensor}`` (the tensors themselves)."""
        return dict(self.model.named_parameters())

    def _buffers(self) -> dict:
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training \
                    and m.track_running_stats:
                raise ValueError(
                    f"BatchNorm layer {name!r} updates running statistics in training "
                    "mode, which would modify the model during adaptation; build it "
                    "with track_running_stats=False (as mlbook.models.Conv4 does)"
                )
        return dict(self.model.named_buffers())

    def _is_batched_params(self, params: dict) -> bool:
        name, p = next(iter(self.model.named_parameters()))
        if name not in params:
            raise ValueError(f"params lacks the model's parameter {name!r}")
        return params[name].dim() == p.dim() + 1

    # -- checks ---------------------------------------------------------------
    def _task_rank(self, x: torch.Tensor, name: str) -> bool:
        """True when ``x`` is a batch of tasks, False when it is one task."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if self.example_dims is None:
            raise ValueError(
                "cannot tell one task from a batch for this model: pass example_dims= "
                "(the number of dims of one input example) to the constructor"
            )
        d = self.example_dims
        if x.dim() not in (d + 1, d + 2):
            raise ValueError(
                f"{name} must be [K, ...] (one task) or [T, K, ...] (a batch) with "
                f"{d} example dim(s), i.e. {d + 1} or {d + 2} dims; got shape "
                f"{tuple(x.shape)}"
            )
        device = next(self.model.parameters()).device
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the model is on {device}")
        return x.dim() == d + 2

    def _check_pair(self, x, y, xname, yname, allow_empty=False) -> bool:
        batched = self._task_rank(x, xname)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{yname} must be a torch.Tensor, got {type(y).__name__}")
        lead = 2 if batched else 1
        if tuple(y.shape[:lead]) != tuple(x.shape[:lead]):
            raise ValueError(
                f"{xname} {tuple(x.shape)} and {yname} {tuple(y.shape)} disagree on "
                f"the leading {'[tasks, points]' if batched else '[points]'} dims"
            )
        if x.shape[lead - 1] == 0 and not allow_empty:
            raise ValueError(f"{xname} is empty: a task needs at least one point")
        return batched

    def _finite(self, loss: torch.Tensor, what: str) -> torch.Tensor:
        # One host sync per call; turn off with check_finite=False for speed.
        if self.check_finite and not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(
                f"{what} is {loss.detach().flatten()[0].item()}: the inner loop diverged "
                f"or the data hold NaN/inf; try a smaller inner_lr (now {self.inner_lr})"
            )
        return loss

    # -- the functional core ----------------------------------------------------
    def _loss(self, params, buffers, x, y):
        """L(f_params(x), y) for one task, without touching the module."""
        return self.loss_fn(functional_call(self.model, (params, buffers), (x,)), y)

    def _adapt_task(self, params, buffers, x, y, steps, first_order):
        """``steps`` SGD steps on one task's support set (vmap adds the task dim)."""
        grad_fn = grad(self._loss)
        for _ in range(steps):
            g = grad_fn(params, buffers, x, y)
            if first_order:
                # First-order MAML: treat the inner gradient as a constant, so the
                # outer derivative of theta' w.r.t. theta is the identity.
                g = {k: v.detach() for k, v in g.items()}
            # theta' = theta - alpha * grad L_support(theta)
            params = {k: p - self.inner_lr * g[k] for k, p in params.items()}
        return params

    # -- public API -------------------------------------------------------------
    def adapt(self, x_support, y_support, steps: int | None = None, params=None,
              first_order: bool | None = None) -> dict:
        """Adapted parameters ``{name: tensor}`` after ``steps`` SGD steps.

        ``x_support``/``y_support`` are one task ``[K, ...]`` or a batch
        ``[T, K, ...]`` (then every returned tensor has a leading ``[T]``).
        ``steps`` defaults to ``inner_steps`` (use more at test time);
        ``params`` defaults to the model's own parameters and may be an
        earlier ``adapt`` result, to continue from it. The module is never
        modified. Under autograd the result is differentiable w.r.t. the
        model's parameters (through every step unless first order).
        """
        steps = self.inner_steps if steps is None else _positive(
            "steps", steps, int, allow_zero=True)
        first_order = self.first_order if first_order is None else first_order
        batched = self._check_pair(x_support, y_support, "x_support", "y_support")
        params = self.params() if params is None else params
        params_batched = self._is_batched_params(params)
        if params_batched and not batched:
            raise ValueError("params hold a batch of tasks but x_support is one task")
        buffers = self._buffers()
        step = partial(self._adapt_task, steps=steps, first_order=first_order)
        if batched:
            step = vmap(step, in_dims=(0 if params_batched else None, None, 0, 0))
        return step(params, buffers, x_support, y_support)

    def predict(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """f_params(x) for one task or a batch (``params`` from ``adapt``)."""
        batched = self._task_rank(x, "x")
        params_batched = self._is_batched_params(params)
        buffers = self._buffers()
        if not batched:
            if params_batched:
                raise ValueError("params hold a batch of tasks but x is one task")
            return functional_call(self.model, (params, buffers), (x,))
        call = lambda p, xb: functional_call(self.model, (p, buffers), (xb,))  # noqa: E731
        return vmap(call, in_dims=(0 if params_batched else None, 0))(params, x)

    def task_losses(self, params: dict, x, y) -> torch.Tensor:
        """Loss of each task ``[T]`` (or a scalar for one task) at ``params``."""
        batched = self._check_pair(x, y, "x", "y")
        if not batched:
            return self._loss(params, self._buffers(), x, y)
        in_p = 0 if self._is_batched_params(params) else None
        return vmap(self._loss, in_dims=(in_p, None, 0, 0))(params, self._buffers(), x, y)
