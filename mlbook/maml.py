"""Model-Agnostic Meta-Learning (Finn et al., 2017), second and first order.

The MAML objective over a task distribution p(T):

    min_theta  E_{T ~ p(T)}  L_T^query( theta'_T ),
    theta'_T = theta - alpha * grad_theta L_T^support(theta)      (one step)

and its meta-gradient, by the chain rule through the inner step:

    grad_theta L^query(theta') = (I - alpha * H_support(theta)) grad L^query(theta')

``MAML.meta_loss`` builds exactly this (through every inner step): the tasks
batched, autograd keeping the inner gradients' graph;
first-order MAML drops the Hessian term. Introduced in
``book/04_maml``.
"""

from __future__ import annotations

import torch
from torch import nn

from .inner import InnerLoop, _positive
from .mlp_grad import maml_adam_step, relu_mlp_meta_grad
from .tasks import TaskBatch

__all__ = ["MAML"]


class MAML(InnerLoop):
    """MAML on any plain ``nn.Module``; ``first_order=True`` gives FOMAML.

    ``adapt``, ``predict`` and ``meta_loss`` never modify ``model``: they return
    new tensors. ``meta_loss(batch).backward()`` leaves the exact MAML
    meta-gradient in the model's ``.grad``.

    ``meta_step``/``step`` of a plain ReLU MLP with MSE and one inner step on
    the CPU (the MAML sinusoid) skip autograd and use the closed form of
    ``mlbook.mlp_grad``. ``compile=True`` also runs that through
    ``torch.compile``, and when the optimizer is a plain ``torch.optim.Adam``
    over the model's parameters the Adam update goes into the same compiled
    call (``mlp_grad.maml_adam_step``; its state stays in the optimizer, in
    Adam's own format). Under a third of the eager time per step; compiling
    takes some 20 s once, needs a C++ compiler, and falls back to eager with a
    warning.

    ``tasks_per_pass`` bounds how many tasks one forward/backward pass of
    ``step`` takes (the gradients of the passes add up to the same
    meta-gradient): a way to fit a large meta-batch in memory. By default all
    tasks go in one pass, except ``Conv4`` on the CPU, which goes task by task
    (faster there). There Conv4 also keeps its activations channels-last in
    the passes differentiated once (the query set; every pass with
    ``first_order=True``) and runs its first layer as a matmul: the same
    meta-gradient in float64, a fifth to a third less time per step than the
    NCHW form (``records/bench-cpu-conv4.json``); in float32 PyTorch's
    channels-last batch norm on the CPU rounds more (about 1e-5 against
    6e-7 for unit-scale inputs).

    ``Conv4`` on CUDA takes the passes differentiated once (the query set;
    every pass with ``first_order=True``, and evaluation's adaptation) through
    ``torch.compile`` whole, and second-order MAML runs batch norm, ReLU and
    max-pool of the support pass as one compiled operation
    (``mlbook.fused_block``). Each is compiled at its first call for each
    shape, which takes seconds; if compiling fails (no Triton for the card,
    say) ``mlbook`` warns once and runs both eagerly, with cuDNN's batch norm.

    Introduced in ``book/01_learning_to_learn``; its objective and meta-gradient
    are derived in ``book/04_maml``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        inner_lr: float,
        inner_steps: int = 1,
        first_order: bool = False,
        example_dims: int | None = None,
        check_finite: bool = True,
        conv_impl: str = "grouped",
        compile: bool = False,
        tasks_per_pass: int | None = None,
    ):
        super().__init__(
            model,
            loss_fn,
            inner_lr,
            inner_steps,
            first_order,
            example_dims,
            check_finite,
            conv_impl,
        )
        self.compile = bool(compile)
        if tasks_per_pass is not None:
            _positive("tasks_per_pass", tasks_per_pass, int)
        self.tasks_per_pass = tasks_per_pass

    def meta_loss(self, batch: TaskBatch, reduce: bool = True) -> torch.Tensor:
        """Mean query loss after ``inner_steps`` steps on each support set.

        The tasks run as one batch (one forward pass over all of them, except
        Conv4 on the CPU, which takes them one at a time; see ``InnerLoop``);
        autograd keeps the inner steps' graph. With ``reduce=False`` the per-task losses
        ``[T]`` are returned.
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
        step's meta-gradient exactly as autograd would (``InnerLoop._mlp_layers``
        and one inner step, this class itself: a subclass may change any step
        of it), else None."""
        if self.inner_steps != 1 or type(self) is not MAML:
            return None
        return self._mlp_layers(batch, batch.x_query, batch.y_query)

    def _adam(self, optimizer, params):
        """``(state, lr, hyper)`` for ``mlp_grad.maml_adam_step`` when the
        optimizer is a plain ``torch.optim.Adam`` over exactly ``params`` and
        the step is compiled (eager, torch's own Adam is faster); else None.
        The state lives in ``optimizer.state`` in Adam's own format, so
        ``state_dict``, checkpoints and later eager steps see it."""
        if not self.compile or type(optimizer) is not torch.optim.Adam:
            return None
        if len(optimizer.param_groups) != 1:
            return None
        group = optimizer.param_groups[0]
        if (
            sorted(map(id, group["params"])) != sorted(map(id, params))
            or group["amsgrad"]
            or group["maximize"]
            or group["capturable"]
            or group["differentiable"]
            or group.get("decoupled_weight_decay", False)
            or any(torch.is_tensor(h) for h in (group["lr"], *group["betas"]))
        ):
            return None
        states = [optimizer.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:  # what Adam's first step would make
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
            if not torch.is_tensor(st["step"]):  # an old state dict: Adam converts it
                return None
        state = tuple(
            [st[k] for st in states] for k in ("exp_avg", "exp_avg_sq", "step")
        )
        beta1, beta2 = group["betas"]
        lr = self._lr_tensor(group["lr"])
        return state, lr, (beta1, beta2, group["eps"], group["weight_decay"])

    def _passes(self, batch):
        """How ``step`` splits the meta-batch into forward/backward passes."""
        n = self.tasks_per_pass
        if n is None:
            # Where Conv4 runs one task at a time (the CPU), one task per pass
            # too: each pass's backward frees its graph before the next pass
            # builds one, so a whole meta-batch's activations are never held.
            by_task = self._one_task_per_pass(batch.x_support, True)
            n = 1 if by_task else batch.num_tasks
        return [slice(i, i + n) for i in range(0, batch.num_tasks, n)]

    def _meta_backward(self, batch):
        """``meta_loss(batch).backward()``, one pass per slice of tasks: the
        meta-gradient is a mean over tasks, so the parts add up to it."""
        passes = self._passes(batch)
        if len(passes) == 1:
            loss = self.meta_loss(batch)
            loss.backward()
            return loss
        total = 0.0
        for s in passes:
            part = batch.tasks(s)
            loss = self.meta_loss(part) * (part.num_tasks / batch.num_tasks)
            loss.backward()
            total = total + loss.detach()
        return total

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> float:
        """One outer update: zero grads, meta-loss, backward, optimizer step."""
        return self.step(batch, optimizer).item()

    def step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """``meta_step`` without the host sync: returns the loss as a tensor on
        the model's device. Capturable in a CUDA graph (``mlbook.graph``)."""
        self._check_meta_batch(batch)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "MAML's outer update needs a torch.optim.Optimizer over the model's "
                f"parameters, got {type(optimizer).__name__}"
            )
        layers = self._explicit_layers(batch)
        adam = None if layers is None else self._adam(optimizer, sum(layers, []))
        if adam is None:  # (the fused step below sets every parameter's grad)
            optimizer.zero_grad(set_to_none=True)
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
                if adam is None:
                    loss, g_w, g_b = self._run(relu_mlp_meta_grad, *args)
                else:  # meta-gradient and Adam in one compiled call
                    state, lr, hyper = adam
                    loss, g_w, g_b = self._run(
                        maml_adam_step, *args[:2], state, *args[2:], lr, hyper
                    )
            # raises before optimizer.step(); maml_adam_step has already
            # skipped its update when the loss is not finite
            self._finite(loss, "meta_loss")
            for p, g in zip(weights + biases, g_w + g_b):
                p.grad = g
            if adam is not None:
                return loss
        else:
            loss = self._meta_backward(batch)
        optimizer.step()
        return loss.detach()

    uses_optimizer = True
