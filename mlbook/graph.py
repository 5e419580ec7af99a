"""One whole meta-step captured in a CUDA graph, then replayed.

A meta-step of small models (Conv4 on 28x28 images, the sinusoid MLP) is
hundreds of small kernels; launching them from Python costs more than running
them. A CUDA graph records the kernels of one step once and replays them with
a single launch: the episode is copied into fixed input buffers, the graph
runs forward, inner gradients, second-order backward and the optimizer step,
and the loss lands in a fixed output tensor. In code::

    step = GraphedStep(learner, optimizer, batch)   # captures once
    loss = step(next_batch)                          # replays: a device tensor

``meta_train(..., cuda_graph=True)`` does this for you. Rules that follow from
replaying recorded kernels (each is checked before anything runs):

* CUDA only; every batch must have the shapes and dtypes of the first one.
* The optimizer, if any, must be built with ``capturable=True`` (Adam, AdamW).
* Nothing in the step may read a value on the host: the learner's
  ``check_finite`` is off inside the graph, so the caller checks the returned
  loss (``meta_train`` reads the losses back every 50 steps and refuses a
  non-finite one, before any checkpoint is written).
* Host-side settings are frozen at capture, except those a learner keeps in a
  device tensor (``AnnealedReptile`` keeps its outer step size there, set by
  ``prepare_step`` before each replay).

Capture runs a few warm-up steps (CUDA needs them to set up its libraries);
the model's parameters and the optimizer's state are put back afterwards, so
a graphed run starts exactly where an eager one would. Discussed in
``book/09_tools``.
"""

from __future__ import annotations

import torch

from .tasks import TaskBatch

__all__ = ["GraphedStep"]

_FIELDS = ("x_support", "y_support", "x_query", "y_query")


class GraphedStep:
    """``learner.step(batch, optimizer)`` recorded once in a CUDA graph
    (``book/09_tools``)."""

    def __init__(self, learner, optimizer, batch: TaskBatch, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs CUDA: no GPU is visible")
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}")
        if not hasattr(learner, "step"):
            raise TypeError(
                f"{type(learner).__name__} has no step(batch, optimizer) to capture"
            )
        model = learner.model
        params = list(model.parameters())
        if any(p.device.type != "cuda" for p in params):
            raise ValueError("the model must be on a CUDA device before capture")
        for name in _FIELDS:
            if getattr(batch, name).device != params[0].device:
                raise ValueError(f"batch.{name} is not on {params[0].device}")
        if optimizer is not None and not all(
            g.get("capturable", False) for g in optimizer.param_groups
        ):
            raise ValueError(
                "the optimizer must be built with capturable=True to be replayed "
                "in a CUDA graph, e.g. torch.optim.Adam(params, lr, capturable=True)"
            )
        # The graph reads and writes the learner's, the model's and the
        # optimizer's tensors (Adam's moments, step) at fixed addresses: hold
        # them, or a caller that keeps only this object lets them be freed and
        # each replay writes into memory that others (or nobody) own.
        self.learner, self.optimizer = learner, optimizer
        self.static = TaskBatch(*(getattr(batch, f).clone() for f in _FIELDS))

        saved_params = [p.detach().clone() for p in params]
        saved_state = _snapshot(optimizer)
        check = learner.check_finite
        learner.check_finite = False  # a host sync cannot be captured
        try:
            # Warm up on a side stream (as torch.cuda.graphs asks), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    learner.step(self.static, optimizer)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = learner.step(self.static, optimizer)
        finally:
            learner.check_finite = check
            # Undo the warm-up steps in place (the graph holds these
            # addresses), and after a failed capture too: the model and the
            # optimizer are left as they were given.
            with torch.no_grad():
                for p, saved in zip(params, saved_params):
                    p.copy_(saved)
            _restore(optimizer, saved_state)
            torch.cuda.synchronize()

    def __call__(self, batch: TaskBatch) -> torch.Tensor:
        """Copy ``batch`` into the graph's inputs, replay, return the loss
        (a 0-dim device tensor, overwritten by the next replay)."""
        for name in _FIELDS:
            new, old = getattr(batch, name), getattr(self.static, name)
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(
                    f"batch.{name} is {tuple(new.shape)} {new.dtype}, but the graph "
                    f"was captured for {tuple(old.shape)} {old.dtype}"
                )
            old.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.loss


def _snapshot(optimizer):
    if optimizer is None:
        return {}
    return {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for p, state in optimizer.state.items()
    }


def _restore(optimizer, saved):
    """Put the optimizer state back in place; state the warm-up created is
    zeroed, which is how Adam and AdamW start it."""
    if optimizer is None:
        return
    with torch.no_grad():
        for p, state in optimizer.state.items():
            before = saved.get(id(p))
            for k, v in state.items():
                if not torch.is_tensor(v):
                    if before is not None:
                        state[k] = before[k]
                    continue
                if before is not None:
                    v.copy_(before[k])
                else:
                    v.zero_()
