"""Reptile (Nichol, Achiam & Schulman, 2018).

For each task, run plain SGD on its support set from theta to phi_T; then move
the initialisation towards the adapted weights:

    theta  <-  theta + outer_lr * ( mean_T phi_T - theta )

No second derivatives and no query-set gradient: the update is a difference of
weights. Introduced in ``book/06_reptile``.
"""

from __future__ import annotations

import torch

from .inner import InnerLoop, _positive
from .mlp_grad import reptile_step
from .tasks import TaskBatch

__all__ = ["Reptile"]


class Reptile(InnerLoop):
    """Reptile with task-batched SGD inner loops; ``meta_step`` updates the model
    in place: theta <- theta + outer_lr * (mean_T phi_T - theta).

    With an ``optimizer`` passed to ``meta_step``, ``theta - mean phi`` is used as
    the gradient and the optimizer takes the step (Reptile with Adam, say);
    otherwise that plain update is applied with ``outer_lr``.

    A plain ReLU MLP with MSE on the CPU (the sinusoid regressor) takes its
    inner steps without autograd, by the closed-form backward pass of
    ``mlbook.mlp_grad`` (the same numbers); ``compile=True`` also runs that
    step, the plain update included, as one ``torch.compile``'d call (some
    20 s to compile once; falls back to eager with a warning). ``Conv4`` on
    CUDA takes its inner steps through ``torch.compile`` (as ``MAML`` does its
    passes differentiated once), compiled at the first step of each shape.
    Introduced in ``book/06_reptile``.
    """

    uses_optimizer = False

    def __init__(
        self,
        model,
        loss_fn,
        inner_lr: float,
        inner_steps: int = 5,
        outer_lr: float = 0.1,
        compile: bool = False,
        **kwargs,
    ):
        super().__init__(
            model, loss_fn, inner_lr, inner_steps, first_order=True, **kwargs
        )
        self.outer_lr = _positive("outer_lr", outer_lr)
        self.compile = bool(compile)
        if self.inner_steps == 0:
            raise ValueError(
                "inner_steps must be >= 1 for Reptile (phi would equal theta)"
            )

    def meta_step(self, batch: TaskBatch, optimizer=None) -> float:
        """One Reptile update from a batch of tasks; returns the mean query loss
        of the adapted weights (the support loss when there are no query points)."""
        return self.step(batch, optimizer).item()

    def step(self, batch: TaskBatch, optimizer=None, outer_lr=None) -> torch.Tensor:
        """``meta_step`` without the host sync: the loss as a tensor on the
        model's device. ``outer_lr`` overrides ``self.outer_lr`` and may be a
        0-dim tensor (a schedule that a CUDA graph replays reads it there).
        Capturable in a CUDA graph (``mlbook.graph``) when ``check_finite`` is
        off."""
        self._check_batch(batch, "meta_step")
        if outer_lr is None:
            outer_lr = self.outer_lr
        elif not torch.is_tensor(outer_lr):  # (a tensor is a graph's schedule)
            _positive("outer_lr", outer_lr)
        has_query = batch.x_query.shape[1] > 0
        x, y = (
            (batch.x_query, batch.y_query)
            if has_query
            else (batch.x_support, batch.y_support)
        )
        layers = self._mlp_layers(batch, x, y) if type(self) is Reptile else None
        if layers is not None:  # the sinusoid MLP: no autograd at all
            return self._closed_form_step(batch, x, y, layers, optimizer, outer_lr)
        with torch.no_grad():  # adapt() turns autograd on for its own steps
            theta = {k: p.detach() for k, p in self.params().items()}
            phi = self.adapt(batch.x_support, batch.y_support, params=theta)  # [T, ...]
            # Every task must be finite: one diverged task would drag theta
            # off through the mean of phi while the mean loss still looked fine.
            losses = self._finite(self.task_losses(phi, x, y), "Reptile loss")  # [T]
            loss = losses.mean()
            for name, p in self.model.named_parameters():
                # theta - mean_T phi_T is the Reptile "gradient"
                direction = p - phi[name].mean(0)
                if optimizer is None:
                    p.sub_(outer_lr * direction)
                else:
                    p.grad = direction.clone()
        if optimizer is not None:
            optimizer.step()
        return loss

    def _closed_form_step(self, batch, x, y, layers, optimizer, outer_lr):
        """``step`` of a ReLU MLP by ``mlp_grad.reptile_step``: the same update
        and loss, through ``torch.compile`` when ``compile=True``."""
        weights, biases = layers
        theta = weights + biases
        if optimizer is not None:
            lr = None  # the optimizer takes the step, from the directions
        elif torch.is_tensor(outer_lr):
            lr = outer_lr
        else:
            lr = self._lr_tensor(outer_lr)
        with torch.no_grad():
            losses, directions = self._run(
                reptile_step,
                [w.detach() for w in weights],
                [b.detach() for b in biases],
                batch.x_support,
                batch.y_support,
                x,
                y,
                self.inner_lr,
                self.inner_steps,
                lr,
                self.check_finite,
            )
        # raises before optimizer.step(); reptile_step has already skipped
        # its own update when a task's loss is not finite
        self._finite(losses, "Reptile loss")
        if optimizer is not None:
            for p, d in zip(theta, directions):
                p.grad = d
            optimizer.step()
        return losses.mean()
