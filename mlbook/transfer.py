"""The transfer-learning baseline: pretrain on pooled tasks, then fine-tune.

Pretraining fits one model to the data of many tasks at once, as if they were
one big regression (or classification) problem:

    min_theta  E_{T ~ p(T)} L_T(theta)          (no inner step inside)

Fine-tuning then takes the same SGD steps on a new task's support set as MAML
does at test time (``adapt``), so the two differ only in how theta was found.
Introduced in ``book/02_meta_vs_transfer``.
"""

from __future__ import annotations

import torch

from .inner import InnerLoop
from .tasks import TaskBatch

__all__ = ["Pretrained"]


class Pretrained(InnerLoop):
    """Joint ("pooled") training of ``model``; ``adapt`` fine-tunes with SGD.
    Introduced in ``book/02_meta_vs_transfer``."""

    uses_optimizer = True

    def pooled_loss(self, batch: TaskBatch) -> torch.Tensor:
        """Loss on every support and query point of every task, pooled."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}")
        self._check_pair(batch.x_support, batch.y_support, "x_support", "y_support")
        x = torch.cat([batch.x_support, batch.x_query], 1).flatten(
            0, 1
        )  # [T*(K+Q), ...]
        y = torch.cat([batch.y_support, batch.y_query], 1).flatten(0, 1)
        return self._finite(self.loss_fn(self.model(x), y), "pooled loss")

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> float:
        """One pretraining step on the pooled data of ``batch``."""
        return self.step(batch, optimizer).item()

    def step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """``meta_step`` without the host sync (the loss as a device tensor)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.pooled_loss(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()
