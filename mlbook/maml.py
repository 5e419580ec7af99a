"""Model-Agnostic Meta-Learning (Finn et al., 2017), second and first order.

The MAML objective over a task distribution p(T):

    min_theta  E_{T ~ p(T)}  L_T^query( theta'_T ),
    theta'_T = theta - alpha * grad_theta L_T^support(theta)      (one step)

and its meta-gradient, by the chain rule through the inner step:

    grad_theta L^query(theta') = (I - alpha * H_support(theta)) grad L^query(theta')

``MAML.meta_loss`` builds exactly this (through every inner step): ``vmap``
batches the tasks, autograd keeps the inner gradients' graph; first-order
MAML drops the Hessian term. Introduced in
``book/04_maml``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .inner import InnerLoop
from .mlp_grad import relu_mlp_meta_grad
from .tasks import TaskBatch

__all__ = ["MAML"]

_COMPILED = None  # torch.compile of relu_mlp_meta_grad, made on first use


class MAML(InnerLoop):
    """MAML on any plain ``nn.Module``; ``first_order=True`` gives FOMAML.

    ``adapt``, ``predict`` and ``meta_loss`` never modify ``model``: they return
    new tensors. ``meta_loss(batch).backward()`` leaves the exact MAML
    meta-gradient in the model's ``.grad``.

    ``meta_step``/``step`` of a plain ReLU MLP with MSE and one inner step on
    the CPU (the MAML sinusoid) skip autograd and use the closed form of
    ``mlbook.mlp_grad``; ``compile=True`` also runs that through
    ``torch.compile`` (about half the time per step; compiling takes some
    20 s once and needs a C++ compiler, and falls back with a warning).
    """

    def __init__(self, *args, compile: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile = bool(compile)

    def meta_loss(self, batch: TaskBatch, reduce: bool = True) -> torch.Tensor:
        """Mean query loss after ``inner_steps`` steps on each support set.

        All tasks run at once (``vmap`` over the task dim). With
        ``reduce=False`` the per-task losses ``[T]`` are returned.
        """
        self._check_meta_batch(batch)
        # theta'_T for every task at once, differentiable w.r.t. theta through
        # all inner steps; then L_T^query(theta'_T) for each task.
        fast = self.adapt(batch.x_support, batch.y_support)  # {name: [T, ...]}
        losses = self.task_losses(fast, batch.x_query, batch.y_query)  # [T]
        self._finite(losses.sum(), "meta_loss")
        return losses.mean() if reduce else losses

    def _check_meta_batch(self, batch):
        self._check_batch(batch, "meta_loss")
        self._check_pair(batch.x_query, batch.y_query, "x_query", "y_query")
        if batch.x_query.shape[1] == 0:
            raise ValueError("x_query is empty: the meta-loss is taken on query points")

    def _explicit_layers(self, batch):
        """The model's (weights, biases) when ``mlbook.mlp_grad`` computes this
        step's meta-gradient exactly as autograd would, else None: a plain
        ReLU MLP with biases, mean squared error, one inner SGD step, this
        class itself (not a subclass), on the CPU (where it is measured to
        pay)."""
        plan = self._plan
        if (
            plan is None
            or self.inner_steps != 1
            or self.loss_fn is not F.mse_loss
            or len(plan) % 2 == 0
            or any(type(s) is not nn.ReLU for s in plan[1::2])
            or any(not isinstance(s, str) for s in plan[0::2])
            or type(self) is not MAML  # a subclass may change any step of it
            or batch.x_support.device.type != "cpu"
            or batch.x_support.dim() != 3
        ):
            return None
        params = self.params()
        weights = [params.get(f"{s}.weight") for s in plan[0::2]]
        biases = [params.get(f"{s}.bias") for s in plan[0::2]]
        if any(b is None for b in biases) or len(params) != 2 * len(weights):
            return None
        out = weights[-1].shape[0]
        t, k, q = batch.num_tasks, batch.x_support.shape[1], batch.x_query.shape[1]
        if batch.y_support.shape != (t, k, out) or batch.y_query.shape != (t, q, out):
            return None  # mse_loss would broadcast: leave it to the general path
        return weights, biases

    def _meta_grad_fn(self):
        if not self.compile:
            return relu_mlp_meta_grad
        global _COMPILED
        if _COMPILED is None:
            _COMPILED = torch.compile(relu_mlp_meta_grad, dynamic=False)

        def run(*args):
            try:
                return _COMPILED(*args)
            except Exception as err:  # noqa: BLE001 - no compiler, say: run eager
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {err}); "
                    "continuing without compile=True",
                    stacklevel=3,
                )
                self.compile = False
                return relu_mlp_meta_grad(*args)

        return run

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> float:
        """One outer update: zero grads, meta-loss, backward, optimizer step."""
        return self.step(batch, optimizer).item()

    def step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """``meta_step`` without the host sync: returns the loss as a tensor on
        the model's device. Capturable in a CUDA graph (``mlbook.graph``)."""
        optimizer.zero_grad(set_to_none=True)
        self._check_meta_batch(batch)
        layers = self._explicit_layers(batch)
        if layers is not None:  # the sinusoid MLP: no autograd graph at all
            weights, biases = layers
            args = (
                [w.detach() for w in weights],
                [b.detach() for b in biases],
                batch.x_support,
                batch.y_support,
                batch.x_query,
                batch.y_query,
                self.inner_lr,
                self.first_order,
            )
            with torch.no_grad():
                loss, g_w, g_b = self._meta_grad_fn()(*args)
            self._finite(loss, "meta_loss")
            for p, g in zip(weights + biases, g_w + g_b):
                p.grad = g
        else:
            loss = self.meta_loss(batch)
            loss.backward()
        optimizer.step()
        return loss.detach()

    uses_optimizer = True
