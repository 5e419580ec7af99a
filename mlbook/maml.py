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

import torch

from .inner import InnerLoop
from .tasks import TaskBatch

__all__ = ["MAML"]


class MAML(InnerLoop):
    """MAML on any plain ``nn.Module``; ``first_order=True`` gives FOMAML.

    ``adapt``, ``predict`` and ``meta_loss`` never modify ``model``: they return
    new tensors. ``meta_loss(batch).backward()`` leaves the exact MAML
    meta-gradient in the model's ``.grad``.
    """

    def meta_loss(self, batch: TaskBatch, reduce: bool = True) -> torch.Tensor:
        """Mean query loss after ``inner_steps`` steps on each support set.

        All tasks run at once (``vmap`` over the task dim). With
        ``reduce=False`` the per-task losses ``[T]`` are returned.
        """
        self._check_batch(batch, "meta_loss")
        self._check_pair(batch.x_query, batch.y_query, "x_query", "y_query")
        if batch.x_query.shape[1] == 0:
            raise ValueError("x_query is empty: the meta-loss is taken on query points")
        # theta'_T for every task at once, differentiable w.r.t. theta through
        # all inner steps; then L_T^query(theta'_T) for each task.
        fast = self.adapt(batch.x_support, batch.y_support)  # {name: [T, ...]}
        losses = self.task_losses(fast, batch.x_query, batch.y_query)  # [T]
        self._finite(losses.sum(), "meta_loss")
        return losses.mean() if reduce else losses

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> float:
        """One outer update: zero grads, meta-loss, backward, optimizer step."""
        return self.step(batch, optimizer).item()

    def step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """``meta_step`` without the host sync: returns the loss as a tensor on
        the model's device. Capturable in a CUDA graph (``mlbook.graph``)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.meta_loss(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    uses_optimizer = True
