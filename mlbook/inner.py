"""The functional inner loop that MAML, Reptile and the transfer baseline share.

Adaptation never touches the module: it reads the module's parameters as a
dict, takes SGD steps on copies, and returns the new dict. Each step is

    theta'  <-  theta' - inner_lr * grad_theta' L_support(f_theta')

with ``torch.func.vmap`` batching the forward pass over tasks (one task and a
batch run the same code) and plain autograd taking the derivatives, keeping
the graph so the outer loop can differentiate through the steps. Introduced
in ``book/03_tasks`` and ``book/04_maml``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.utils import _pair

from . import fused_block
from .fused_block import bn_relu_pool
from .grouped_conv import grouped_conv2d, shared_conv2d
from .tasks import TaskBatch

__all__ = ["InnerLoop"]

# A function of mlbook.mlp_grad -> its torch.compile, made on first use
_COMPILED = {}

# How many dims one example has, read off the first layer that fixes it.
_EXAMPLE_DIMS = {nn.Linear: 1, nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}


# Parameter-free layers that act elementwise: fine on a [T, K, features] tensor.
_ELEMENTWISE = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)


def _shares_modules(seq: nn.Sequential) -> bool:
    # named_children() lists a module used twice only once: a plan built from
    # it would silently drop the second use (a reused ReLU). A parameter shared
    # by two layers has one name only, which the plans' lookups cannot find.
    every_use = len(list(seq.named_parameters(remove_duplicate=False)))
    reused_module = len(list(seq.named_children())) != len(seq._modules)
    return reused_module or every_use != len(list(seq.named_parameters()))


def _check_no_reused_weighted_module(model: nn.Module):
    """One module with parameters at two places in the model is refused:
    torch.func.functional_call (how adaptation runs a model on copies of its
    parameters) swaps that module's tensors twice and restores them wrongly,
    leaving the copies in the model (seen in torch 2.13)."""
    first = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not any(True for _ in m.parameters(recurse=False)) and not any(
            True for _ in m.buffers(recurse=False)
        ):
            continue
        if id(m) in first:
            raise ValueError(
                f"the model uses its module {first[id(m)]!r} again at {name!r}; "
                "adapting copies of its parameters would leave them in the model "
                "(torch.func.functional_call cannot swap a module used twice). "
                "Use a separate module at each place, and tie their parameters "
                "(b.weight = a.weight) if they are meant to be shared"
            )
        first[id(m)] = name


def _sequential_plan(model: nn.Module):
    """For an ``nn.Sequential`` of Linear layers and elementwise activations
    (``mlbook.models.MLP``), the layer list the fast batched forward walks;
    None for any other model, which then runs under ``vmap``."""
    if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
        return None
    if _shares_modules(model):
        return None
    plan = []
    for name, layer in model.named_children():
        if type(layer) is nn.Linear:
            plan.append(name)
        elif type(layer) in _ELEMENTWISE:
            plan.append(layer)
        else:
            return None
    return plan


def _conv_plan(model: nn.Module):
    """For ``mlbook.models.Conv4`` (conv -> batch norm -> ReLU -> max-pool
    blocks, then a linear head), the layer list of the hand-batched forward;
    None for any other model."""
    from .models import Conv4  # models imports nothing from here

    if type(model) is not Conv4 or _shares_modules(model.features):
        return None
    plan = []
    for name, layer in model.features.named_children():
        name = f"features.{name}"
        plain_conv = (
            type(layer) is nn.Conv2d
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple)
        )
        if plain_conv:
            plan.append(("conv", name, layer))
        elif type(layer) is nn.BatchNorm2d and not layer.track_running_stats:
            plan.append(("norm", name, layer))
        elif type(layer) is nn.MaxPool2d:
            plan.append(("pool", name, layer))
        elif type(layer) in _ELEMENTWISE:
            plan.append(("act", name, layer))
        else:
            return None
    if type(model.head) is not nn.Linear:
        return None
    return plan + [("head", "head", model.head)]


def _patches(h, conv: nn.Conv2d):
    """``conv``'s input patches of ``h`` as ``F.unfold`` lays them out
    ``[N, C*k*k, L]``, and the output's ``(height, width)``, L = their product."""
    k, pad, stride, dil = conv.kernel_size, conv.padding, conv.stride, conv.dilation
    size = [
        (h.shape[2 + d] + 2 * pad[d] - dil[d] * (k[d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    ]
    return F.unfold(h, k, dil, pad, stride), size


def _fusable(plan, i):
    """Whether plan[i] (a batch norm) is followed by a ReLU and a 2x2 max-pool,
    the block mlbook.fused_block computes as one."""
    if i + 2 >= len(plan) or plan[i + 1][0] != "act" or plan[i + 2][0] != "pool":
        return False
    act, pool = plan[i + 1][2], plan[i + 2][2]
    norm = plan[i][2]
    return (
        type(act) is nn.ReLU
        and norm.affine
        and _pair(pool.kernel_size) == (2, 2)
        and _pair(pool.stride or pool.kernel_size) == (2, 2)
        and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _task(params: dict, i: int) -> dict:
    """Task i's slice ``[1, ...]`` of per-task weights ``{name: [T, ...]}``."""
    return {k: p[i : i + 1] for k, p in params.items()}


def _positive(name, value, kind=float, allow_zero=False):
    ok = isinstance(value, (int, float) if kind is float else int)
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        kind_name = "finite number" if kind is float else "int"
        raise ValueError(f"{name} must be a {kind_name} {bound}, got {value!r}")
    return value


def _first_layer(model: nn.Module):
    """The layer an example enters, when it is a Linear/Conv layer whose
    input size the examples must have: the first layer with parameters of a
    model that runs its layers in the order it holds them (an
    ``nn.Sequential``, Conv4). None otherwise (an embedding first, say)."""
    from .models import Conv4  # models imports nothing from here

    if not isinstance(model, (nn.Sequential, Conv4)):
        return None
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            return module if isinstance(module, tuple(_EXAMPLE_DIMS)) else None
    return None


def _example_dims(model: nn.Module):
    """(dims of one example, the layer they were read off): the first
    Linear/Conv layer the model registers; (None, None) without one."""
    for name, module in model.named_modules():
        for cls, dims in _EXAMPLE_DIMS.items():
            if isinstance(module, cls):
                return dims, f"{name or 'the model'} ({cls.__name__})"
    return None, None


class InnerLoop:
    """SGD adaptation of a plain ``nn.Module`` on one task or a batch of tasks.

    ``example_dims`` is how many dims one input example has (1 for vectors,
    3 for images ``[C, H, W]``); it is read off the model's first Linear/Conv
    layer when not given, and tells ``[K, ...]`` (one task) from ``[T, K, ...]``.

    Batches of tasks run as one forward pass: a plain MLP as one ``baddbmm``
    per layer, ``mlbook.models.Conv4`` with the tasks' channels side by side
    (``conv_impl="grouped"``: one grouped convolution per layer; ``"bmm"``:
    unfold + batched matmul), any other module under ``torch.func.vmap``.
    On the CPU, Conv4 takes a batch of tasks one task at a time (faster there).
    ``check_finite=False`` skips the host-side NaN check (one sync per call).
    """

    compile = False  # MAML and Reptile take it as an argument (see _run)
    _lr = None  # (a learning rate, the same as a 0-dim tensor): see _lr_tensor

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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(prediction, target)")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to adapt")
        _check_no_reused_weighted_module(model)
        self.model = model
        self.loss_fn = loss_fn
        self.inner_lr = _positive("inner_lr", inner_lr)
        self.inner_steps = _positive("inner_steps", inner_steps, int, allow_zero=True)
        self.first_order = bool(first_order)
        self._dims_from = None  # the layer example_dims was read off, if any
        if example_dims is not None:
            _positive("example_dims", example_dims, int)
        else:
            example_dims, self._dims_from = _example_dims(model)
        self.example_dims = example_dims
        self._first_layer = _first_layer(model)
        self.check_finite = check_finite
        # A plain MLP gets a hand-batched forward (one bmm per layer): same
        # numbers as vmap, a fraction of its per-call overhead on tiny models.
        self._plan = _sequential_plan(model)
        # Conv4 gets one too: the tasks' channels side by side, so each layer
        # is one grouped convolution (or one bmm) and one batch norm.
        self._conv_plan = _conv_plan(model)
        if conv_impl not in ("grouped", "bmm"):
            raise ValueError(f"conv_impl must be 'grouped' or 'bmm', got {conv_impl!r}")
        self.conv_impl = conv_impl  # how Conv4's convolutions are batched
        # Speed experiment (python -m mlbook bench --experiments), not API:
        # batch norm written with plain ops.
        self._plain_norm = False
        # Conv4's activations channels-last (NHWC) in the passes
        # differentiated once ("once": MAML's query set, every pass of
        # first-order MAML and Reptile), in every pass (True) or in none
        # (False). None: "once" on the CPU, none on CUDA. On the CPU oneDNN's
        # convolutions and ATen's batch norm and max-pool run faster in NHWC
        # (max-pool of a 5-way query set's first layer: 0.8 against 10 ms),
        # batch norm's double backward slower (its sums). With the first
        # layer below, records/bench-cpu-conv4.json times the CPU's steps
        # against their NCHW form ("mlbook NCHW"). On the H200, NHWC in
        # every pass made the graphed 5-way step slower (15.9 against 12.8
        # ms, records/bench-h200-levers.json).
        self._channels_last = None
        # First-layer filters on one input channel as one batched matmul
        # (True) or a convolution (False). On CUDA, F.conv2d takes a slow
        # depthwise kernel there (~1 ms of the H200's 5-way step); on the
        # CPU the matmul is the faster too, and in NHWC it writes the
        # channels-last output directly (see _one_channel_conv).
        self._one_channel_matmul = True
        # Batch norm -> ReLU -> max-pool compiled as one (mlbook.fused_block).
        # None: on CUDA in the passes differentiated twice (MAML's support
        # set), where it replaces batch norm's double backward: with the
        # matmul, the H200's graphed 5-way MAML step went from 8.74 to 5.69
        # ms, 20-way from 40.0 to 21.8 ms (records/bench-h200-fused-block.json).
        # Fused in every pass the 5-way step took 6.20 ms, and a first-order
        # step was slower with the block than without (5.85 against 4.89 ms;
        # bench-h200-levers-timed.json). Never on the CPU (one task per pass
        # there). True/False force it; "twice" is the CUDA rule on any device.
        self._fused_block = None
        # The block's two statistics in one read of h (torch.var_mean, a
        # Welford reduction once compiled) rather than two.
        self._one_pass_stats = True
        # Conv4's passes differentiated once (MAML's query set, every pass of
        # first-order MAML and Reptile) through torch.compile, forward and
        # backward each one graph (a compiled backward cannot be
        # differentiated again, hence once only). None: on CUDA while
        # torch.compile works there; not on the CPU (not timed there, where
        # one task per pass leaves little to fuse). With the one-pass
        # statistics above, the H200's graphed steps went from 5.65 to 4.47
        # ms (5-way MAML), 21.7 to 20.1 ms (20-way), 4.03 to 2.62 ms
        # (first-order) and 7.23 to 4.37 ms (Reptile), in less memory
        # (records/bench-h200-defaults.json). True/False force it.
        self._compiled_passes = None
        self._compiled_losses = None  # its torch.compile, made on first use
        # At the first inner step every task's weights are theta itself (an
        # expand): Conv4's convolutions after the first, in an eager pass,
        # as dense convolutions over N*T examples with one filter bank
        # (mlbook.grouped_conv.shared_conv2d), each task's weight gradient
        # still grouped. On an H200 cuDNN's grouped convolutions convert
        # NCHW<->NHWC around each call (0.5 ms of a 5-way step's 6 ms of
        # kernels, records/bench-h200-profile-fused-block.json). Not timed
        # on a GPU yet, so off by default: `bench --experiments`' "shared
        # first step + graph" times it.
        self._shared_first_step = False
        self._norms = None
        # Second-order passes through Conv4 take mlbook.grouped_conv (True) or
        # autograd's double backward of F.conv2d (False). None: the first on
        # CUDA, where autograd's per-task loop made the step 1.3-1.5x slower
        # (records/bench-h200-conv4.json); the second on the CPU, where
        # Conv4 runs one task at a time (one group, no loop).
        self._batched_double = None
        # Conv4 on a batch of tasks one task at a time (True) or all at once
        # (False); None: the first on the CPU, the second elsewhere (see
        # _one_task_per_pass).
        self._task_by_task = None

    # -- parameters -----------------------------------------------------------
    def params(self) -> dict:
        """The model's parameters as ``{name: tensor}`` (the tensors themselves)."""
        params = dict(self.model.named_parameters())
        frozen = [k for k, p in params.items() if not p.requires_grad]
        if frozen:
            # Every path adapts and meta-trains every parameter; a frozen one
            # would be moved by some (hand-written gradients, Reptile's
            # step) and not by others, so none takes it.
            raise ValueError(
                f"parameters {frozen} have requires_grad=False; mlbook adapts "
                "and meta-trains every parameter of the model. To keep some "
                "fixed, adapt them all and reset those after each step (see "
                "book/10_summary, Exercise 3), or leave them out of the model"
            )
        return params

    def _buffers(self) -> dict:
        if self._norms is None:  # found once: walking the modules every call is slow
            self._norms = [
                (name, m)
                for name, m in self.model.named_modules()
                # batch norm and instance norm alike
                if isinstance(m, nn.modules.batchnorm._NormBase)
            ]
        for name, m in self._norms:
            if m.training and m.track_running_stats:
                raise ValueError(
                    f"{type(m).__name__} layer {name!r} updates running statistics "
                    "in training mode, which would modify the model during "
                    "adaptation; build it with track_running_stats=False (as "
                    "mlbook.models.Conv4 does)"
                )
        return dict(self.model.named_buffers())

    def _is_batched_params(self, params: dict) -> bool:
        name, p = next(iter(self.model.named_parameters()))
        if name not in params:
            raise ValueError(f"params lacks the model's parameter {name!r}")
        return params[name].dim() == p.dim() + 1

    def _check_params_for(self, params: dict, x: torch.Tensor, batched: bool) -> bool:
        """Whether ``params`` hold a batch of tasks; then ``x`` must be a
        batch of as many tasks."""
        # every missing name at once (before _is_batched_params names only
        # the first); a forward would quietly take the model's own instead
        missing = [k for k, _ in self.model.named_parameters() if k not in params]
        if missing:
            raise ValueError(f"params lacks the model's parameters {missing}")
        params_batched = self._is_batched_params(params)
        if params_batched and not batched:
            raise ValueError("params hold a batch of tasks but x is one task")
        if params_batched:
            t = next(iter(params.values())).shape[0]
            if t != x.shape[0]:
                raise ValueError(f"params hold {t} tasks but x holds {x.shape[0]}")
        return params_batched

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
            # a layer registered before the input layer (a head defined
            # first, say) gives the wrong count: say where it came from
            source = (
                f" (read off {self._dims_from}, the first Linear/Conv layer the "
                "model registers; pass example_dims= if examples enter elsewhere)"
                if self._dims_from
                else ""
            )
            raise ValueError(
                f"{name} must be [K, ...] (one task) or [T, K, ...] (a batch) with "
                f"{d} example dim(s){source}, i.e. {d + 1} or {d + 2} dims; got "
                f"shape {tuple(x.shape)}"
            )
        param = next(self.model.parameters())
        if x.device != param.device:
            raise ValueError(
                f"{name} is on {x.device} but the model is on {param.device}"
            )
        first, d = self._first_layer, self.example_dims
        if isinstance(first, nn.Linear) and d == 1 and x.shape[-1] != first.in_features:
            raise ValueError(
                f"{name} has {x.shape[-1]} features per example, the model's "
                f"first layer takes {first.in_features}"
            )
        if isinstance(first, nn.Conv2d) and d == 3 and x.shape[-3] != first.in_channels:
            raise ValueError(
                f"{name} has {x.shape[-3]} channels per example, the model's "
                f"first layer takes {first.in_channels}"
            )
        # (integer inputs are fine for a model that embeds them; a first
        # Linear/Conv layer, or float data, must match the parameters)
        if x.dtype != param.dtype and (x.is_floating_point() or first is not None):
            raise ValueError(
                f"{name} is {x.dtype} but the model's parameters are {param.dtype}; "
                f"convert one of them (x.to({param.dtype}) or model.to({x.dtype}))"
            )
        return x.dim() == d + 2

    def _check_pair(self, x, y, xname, yname, allow_empty=False) -> bool:
        batched = self._task_rank(x, xname)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{yname} must be a torch.Tensor, got {type(y).__name__}")
        if y.device != x.device:
            raise ValueError(f"{yname} is on {y.device} but {xname} is on {x.device}")
        lead = 2 if batched else 1
        if tuple(y.shape[:lead]) != tuple(x.shape[:lead]):
            raise ValueError(
                f"{xname} {tuple(x.shape)} and {yname} {tuple(y.shape)} disagree on "
                f"the leading {'[tasks, points]' if batched else '[points]'} dims"
            )
        if x.shape[lead - 1] == 0 and not allow_empty:
            raise ValueError(f"{xname} is empty: a task needs at least one point")
        return batched

    def _check_batch(self, batch, what: str):
        """``batch`` must be a TaskBatch whose support set is a batch of tasks."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}")
        if not self._check_pair(
            batch.x_support, batch.y_support, "x_support", "y_support"
        ):
            raise ValueError(
                f"{what} needs x_support as a batch [T, K, ...], got one "
                f"task {tuple(batch.x_support.shape)}; use batch.task(i)"
            )

    def _finite(self, loss: torch.Tensor, what: str) -> torch.Tensor:
        # One host sync per call; turn off with check_finite=False for speed.
        if self.check_finite and not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(
                f"{what} is not finite: the inner loop "
                "diverged or the data hold NaN/inf; try a smaller inner_lr "
                f"(now {self.inner_lr})"
            )
        return loss

    def _mlp_layers(self, batch, x_eval, y_eval):
        """The model's (weights, biases) when the closed forms of
        ``mlbook.mlp_grad`` compute a step on ``batch`` (support set, and
        ``x_eval``/``y_eval`` where its loss is taken) exactly as autograd
        would, else None: a plain ReLU MLP with biases, mean squared error, on
        the CPU (where they are measured to pay)."""
        plan = self._plan
        if (
            plan is None
            or self.loss_fn is not F.mse_loss
            or len(plan) % 2 == 0
            or any(type(s) is not nn.ReLU for s in plan[1::2])
            or any(not isinstance(s, str) for s in plan[0::2])
            or batch.x_support.device.type != "cpu"
            or batch.x_support.dim() != 3
            # targets of another dtype: autograd's gradients take the
            # parameters' dtype, the closed forms would not
            or batch.y_support.dtype != batch.x_support.dtype
            or y_eval.dtype != batch.x_support.dtype
        ):
            return None
        params = self.params()
        weights = [params.get(f"{s}.weight") for s in plan[0::2]]
        biases = [params.get(f"{s}.bias") for s in plan[0::2]]
        if any(b is None for b in biases) or len(params) != 2 * len(weights):
            return None
        out = weights[-1].shape[0]
        t, k, q = batch.num_tasks, batch.x_support.shape[1], x_eval.shape[1]
        if batch.y_support.shape != (t, k, out) or y_eval.shape != (t, q, out):
            return None  # mse_loss would broadcast: leave it to the general path
        return weights, biases

    def _lr_tensor(self, value: float) -> torch.Tensor:
        """``value`` as a 0-dim float64 tensor, the same tensor while the value
        stays: a compiled step reads a learning rate from a tensor, so a new
        value (a schedule) does not recompile it."""
        if self._lr is None or self._lr[0] != value:
            self._lr = (value, torch.tensor(value, dtype=torch.float64))
        return self._lr[1]

    def _run(self, fn, *args):
        """``fn(*args)``, through torch.compile when ``self.compile``."""
        if self.compile:
            if fn not in _COMPILED:
                # cpp_wrapper: the generated code calls its kernels from C++,
                # which saves about a tenth of the MAML sinusoid step (measured)
                _COMPILED[fn] = torch.compile(
                    fn, dynamic=False, options={"cpp_wrapper": True}
                )
            try:
                return _COMPILED[fn](*args)
            except Exception as err:  # noqa: BLE001 - no compiler, say: run eager
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {err}); "
                    "continuing without compile=True",
                    stacklevel=3,
                )
                self.compile = False
        return fn(*args)

    # -- the functional core ----------------------------------------------------
    def _one_task_per_pass(self, x, batched) -> bool:
        """Whether a batch of tasks goes through Conv4 one task at a time. By
        default on the CPU, where a grouped convolution over T tasks' channels
        runs slower than T plain ones and a whole batch's activations outgrow
        the caches (``python -m mlbook bench --device cpu --workloads
        conv4-reptile`` times Reptile's step both ways)."""
        by_task = self._task_by_task
        if by_task is None:
            by_task = x.device.type == "cpu"
        return batched and by_task and self._conv_plan is not None and x.shape[0] > 1

    def _forward(
        self, params, buffers, x, batched, params_batched, twice=False, shared=False
    ):
        """f_params(x) for one task, or for each task of a batch ``[T, K, ...]``.
        ``twice``: this pass will be differentiated twice (MAML's support set).
        ``shared``: the batched ``params`` are expands of the model's own, whose
        derivatives are only summed over tasks (``_adapt``'s first step)."""
        if not batched:
            return functional_call(self.model, (params, buffers), (x,))
        if self._plan is not None and params_batched and x.dim() == 3:
            h = x  # [T, K, in]
            for step in self._plan:
                if isinstance(step, str):  # Linear: h W^T + b, per task
                    w, b = params[f"{step}.weight"], params.get(f"{step}.bias")
                    h = (
                        torch.bmm(h, w.transpose(1, 2))
                        if b is None
                        else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                    )
                else:
                    h = step(h)
            return h  # [T, K, out]
        if self._conv_plan is not None and params_batched:
            if self._one_task_per_pass(x, batched):
                outs = [
                    self._conv_forward(_task(params, i), x[i : i + 1], twice)
                    for i in range(x.shape[0])
                ]
                return torch.cat(outs)
            return self._conv_forward(params, x, twice, shared)
        call = lambda p, xb: functional_call(self.model, (p, buffers), (xb,))  # noqa: E731
        # randomness: each task draws its own dropout masks (and the like)
        return vmap(
            call, in_dims=(0 if params_batched else None, 0), randomness="different"
        )(params, x)

    def _conv_forward(self, params, x, twice=False, shared=False):
        """Conv4 on a batch of tasks ``x: [T, N, C, H, W]`` with per-task
        weights ``[T, ...]``, without vmap: activations are laid out as
        ``[N, T*C, H, W]`` (task t owns channels t*C .. t*C+C-1), so

        * conv: one convolution with ``groups=T`` (task t's filters see only
          its own channels), or an unfold + ``bmm`` (``conv_impl="bmm"``);
        * batch norm: statistics per channel over (N, H, W), which is per task
          per channel: exactly what the per-task module computes;
        * ReLU and max-pool act per channel anyway.

        Same function as the module under vmap (tests/test_maml.py checks it
        in float64); fewer, larger kernels.
        """
        t, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])
        nhwc = self._nhwc(h, twice)
        if nhwc:
            h = h.contiguous(memory_format=torch.channels_last)
        plan, i = self._conv_plan, 0
        while i < len(plan):
            kind, name, layer = plan[i]
            i += 1
            if kind == "conv":
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                h = self._conv(h, w, b, layer, t, twice, nhwc, shared)
                if nhwc:
                    # a no-op after a convolution of channels-last input; but
                    # an input of one channel is both layouts, and the
                    # convolution then answers in NCHW
                    h = h.contiguous(memory_format=torch.channels_last)
            elif kind == "norm" and self._fuses(h, twice) and _fusable(plan, i - 1):
                g, b = params[f"{name}.weight"], params[f"{name}.bias"]
                h = bn_relu_pool(
                    h, g.reshape(-1), b.reshape(-1), layer.eps,
                    one_pass=self._one_pass_stats,
                )
                i += 2  # the ReLU and the max-pool are in it
            elif kind == "norm" and self._plain_norm:
                g, b = params[f"{name}.weight"], params[f"{name}.bias"]
                mean = h.mean((0, 2, 3), keepdim=True)
                var = (h - mean).square().mean((0, 2, 3), keepdim=True)
                h = (h - mean) * torch.rsqrt(var + layer.eps) * g.reshape(
                    1, -1, 1, 1
                ) + b.reshape(1, -1, 1, 1)
            elif kind == "norm":
                g, b = params.get(f"{name}.weight"), params.get(f"{name}.bias")
                h = F.batch_norm(
                    h, None, None,
                    None if g is None else g.reshape(-1),
                    None if b is None else b.reshape(-1),
                    training=True, eps=layer.eps,
                )
            elif kind == "pool":
                h = F.max_pool2d(
                    h, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, layer.ceil_mode,
                )
            elif kind == "act":
                h = layer(h)
            else:  # head: flatten each task's features, then x W^T + b per task
                h = h.reshape(n, t, -1).transpose(0, 1)  # [T, N, features]
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                h = (
                    torch.bmm(h, w.transpose(1, 2))
                    if b is None
                    else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                )
        return h  # [T, N, classes]

    def _nhwc(self, h, twice) -> bool:
        """Whether this pass keeps Conv4's activations channels-last (see
        ``__init__``)."""
        nhwc = self._channels_last
        if nhwc is None:
            nhwc = "once" if h.device.type == "cpu" else False
        return not twice if nhwc == "once" else nhwc

    def _fuses(self, h, twice) -> bool:
        """Whether this pass takes mlbook.fused_block (see ``__init__``)."""
        fused = self._fused_block
        if fused is None:
            # Once torch.compile has failed here (no Triton for this GPU,
            # say), the block would run its formulas eagerly, one kernel per
            # operation: the very cost it exists to remove, so the default
            # goes back to cuDNN's batch norm
            works = fused_block.compile_error is None
            fused = "twice" if h.is_cuda and works else False
        return twice if fused == "twice" else fused

    def _compiles(self, x) -> bool:
        """Whether a pass differentiated once goes through torch.compile
        (see ``__init__``)."""
        compiled = self._compiled_passes
        if compiled is None:
            compiled = x.is_cuda and fused_block.compile_error is None
        return compiled

    def _conv(self, h, w, b, layer, t, twice=False, channels_last=False, shared=False):
        """Task t's filters ``w[t]`` on task t's channels of ``h``."""
        if self.conv_impl == "grouped" and self._one_channel_matmul and w.shape[2] == 1:
            return self._one_channel_conv(h, w, b, layer, t, channels_last)
        if shared and self.conv_impl == "grouped" and t > 1 and h.is_contiguous():
            # every task's filters are theta (see __init__): dense
            return shared_conv2d(h, w, b, layer.stride, layer.padding, layer.dilation)
        if self.conv_impl == "grouped":
            # A pass differentiated twice takes the convolution whose second
            # derivative is batched over tasks (autograd's loops over them).
            own = self._batched_double
            own = h.is_cuda if own is None else own
            conv = grouped_conv2d if twice and own else F.conv2d
            return conv(
                h, w.reshape(-1, *w.shape[2:]),
                None if b is None else b.reshape(-1),
                layer.stride, layer.padding, layer.dilation, groups=t,
            )
        # unfold + bmm: patches [T, C*k*k, N*L] times filters [T, C_out, C*k*k]
        n = h.shape[0]
        cols, out_size = _patches(h, layer)  # [N, T*C*k*k, L]
        length = cols.shape[-1]
        cols = cols.reshape(n, t, -1, length).permute(1, 2, 0, 3)
        cols = cols.reshape(t, -1, n * length)
        out = torch.bmm(w.reshape(t, w.shape[1], -1), cols)  # [T, C_out, N*L]
        if b is not None:
            # a separate add, not _one_channel_conv's bias tap: a row of ones
            # appended here would copy patches of C*k*k rows, larger than the
            # C_out-channel output for every layer after the first
            out = out + b.unsqueeze(2)
        out = out.reshape(t, -1, n, length).permute(2, 0, 1, 3)  # [N, T, C_out, L]
        return out.reshape(n, -1, *out_size)

    def _one_channel_conv(self, h, w, b, layer, t, channels_last=False):
        """Filters on one input channel per task (Conv4's first layer), as a
        matmul. On CUDA, ``F.conv2d`` sends a grouped convolution with one
        input channel per group to its own depthwise kernel (not cuDNN),
        which took ~1 ms of a 5-way step on the H200. Per example n, task t::

            out[n, t] = w_t [C_out, k*k]  @  patches[n, t] [k*k, L]

        one batched matmul over (n, t) whose result is already laid out as
        ``[N, T*C_out, L]``. The bias rides in the matmul, as one more filter
        tap on a patch row of ones::

            [w_t | b_t]  @  [patches[n, t]; 1]  =  w_t @ patches[n, t] + b_t

        so the layer's largest tensor is not read and written again to add
        it, nor summed again for its gradient (the product does both, on
        the patches, a seventh of its size).

        ``channels_last`` (one task): the product the other way round,
        ``patches^T [N, L, k*k] @ w^T [k*k, C_out]``, is the output in NHWC
        memory already, where a convolution of a one-channel input would
        answer in NCHW and need a copy. Both factors are made contiguous:
        the gradient of a transposed right factor comes out as a product
        that took ~4 ms on the CPU where its transpose takes 0.7 ms.
        """
        n = h.shape[0]
        cols, out_size = _patches(h, layer)  # [N, T*k*k, L]
        cols = cols.view(n, t, -1, cols.shape[-1])
        w = w.reshape(t, w.shape[1], -1)  # [T, C_out, k*k]
        if b is not None:
            cols = torch.cat([cols, cols.new_ones(n, t, 1, cols.shape[-1])], 2)
            w = torch.cat([w, b.unsqueeze(-1)], 2)
        if channels_last and t == 1:
            cols = cols[:, 0].transpose(1, 2).contiguous()  # [N, L, k*k]
            out = torch.matmul(cols, w[0].t().contiguous())  # [N, L, C_out]
            return out.view(n, *out_size, -1).permute(0, 3, 1, 2)
        out = torch.matmul(w, cols)  # [N, T, C_out, L]
        return out.reshape(n, -1, *out_size)

    def _losses(
        self, params, buffers, x, y, batched, params_batched, twice=False, shared=False
    ):
        """Loss of each task ``[T]`` (a scalar for one task); ``shared`` as in
        ``_forward`` (the compiled passes do not take it)."""
        if not twice and self._conv_plan is not None and self._compiles(x):
            if self._compiled_losses is None:
                # shapes fixed: each of support, query and evaluation sets
                # gets its own graph; a failed compile warns and runs eagerly
                compiled = torch.compile(self._pass_losses, dynamic=False)
                self._compiled_losses = fused_block.compiled_or_eager(
                    compiled, self._pass_losses
                )
            args = params, buffers, x, y, batched, params_batched
            return self._compiled_losses(*args)
        args = params, buffers, x, y, batched, params_batched, twice, shared
        return self._pass_losses(*args)

    def _pass_losses(
        self, params, buffers, x, y, batched, params_batched, twice=False, shared=False
    ):
        """``_losses`` as plain PyTorch operations."""
        pred = self._forward(params, buffers, x, batched, params_batched, twice, shared)
        if self.loss_fn is F.mse_loss and pred.shape != y.shape:
            # mse_loss would broadcast [T, K, 1] against [T, K] into nonsense
            raise ValueError(
                f"targets of shape {tuple(y.shape)} for predictions of shape "
                f"{tuple(pred.shape)}: mean squared error needs the same shape"
            )
        if not batched:
            return self.loss_fn(pred, y)
        if self.loss_fn is F.mse_loss:  # the mean over each task's points
            return (pred - y).square().flatten(1).mean(1)
        if self.loss_fn is F.cross_entropy and pred.dim() == 3 and y.dim() == 2:
            # [T, N, classes] against class labels [T, N]: F.cross_entropy's
            # mean for each task, over the examples whose label is not its
            # ignore_index (-100); those count 0 in reduction="none"
            per_example = F.cross_entropy(
                pred.flatten(0, 1), y.flatten(), reduction="none"
            )
            return per_example.view(y.shape).sum(1) / (y != -100).sum(1)
        return vmap(self.loss_fn)(pred, y)

    def _adapt(self, params, buffers, x, y, steps, first_order, batched):
        """``steps`` SGD steps from ``params`` on the support set ``(x, y)``.

        ``vmap`` only batches the forward pass over tasks; derivatives come from
        plain autograd. (torch.func's ``grad`` under ``vmap`` gets the second
        derivative of batch/layer/instance norm wrong in torch 2.13; autograd
        through the batched forward is exact: tests/test_maml.py checks Conv4.)
        """
        if self._one_task_per_pass(x, batched):
            # each task's whole inner loop, then the next task's (under
            # no_grad one task's activations are freed before the next's)
            shared = not self._is_batched_params(params)
            parts = []
            for i in range(x.shape[0]):
                own = params if shared else _task(params, i)
                xy = x[i : i + 1], y[i : i + 1]
                parts.append(self._adapt(own, buffers, *xy, steps, first_order, True))
            return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        # Outside autograd (evaluation, Reptile) nothing needs to be kept for an
        # outer derivative: work on detached leaves and return detached tensors.
        differentiable = torch.is_grad_enabled()
        create_graph = differentiable and not first_order
        # Whether the first step's weights are one theta for every task (as
        # MAML's and Reptile's are): then Conv4 may run them as one (see
        # InnerLoop.__init__)
        from_theta = batched and not self._is_batched_params(params)
        with torch.enable_grad():
            if from_theta:
                # One copy of theta per task: [T, ...]. expand() costs no memory,
                # and autograd sums the per-task derivatives back into theta.
                num_tasks = x.shape[0]
                params = {k: p.expand(num_tasks, *p.shape) for k, p in params.items()}
            if not differentiable:
                params = {k: p.detach().requires_grad_() for k, p in params.items()}
            params = {
                k: p if p.requires_grad else p.detach().requires_grad_()
                for k, p in params.items()
            }
            for step in range(steps):
                shared = from_theta and step == 0 and self._shared_first_step
                losses = self._losses(
                    params, buffers, x, y, batched, batched, create_graph, shared
                )
                # Task t's loss depends only on its own slice of the batched
                # weights, so d(sum_t L_t)/d(theta_t) is task t's own gradient.
                grads = torch.autograd.grad(
                    losses.sum(), list(params.values()), create_graph=create_graph
                )
                params = self.inner_update(params, dict(zip(params, grads)))
                if not differentiable:
                    params = {k: p.detach().requires_grad_() for k, p in params.items()}
        if not differentiable:
            params = {k: p.detach() for k, p in params.items()}
        if steps == 0:  # new tensors, never the model's own (or views of them)
            params = {k: p.clone() for k, p in params.items()}
        return params

    # -- public API -------------------------------------------------------------
    def inner_update(self, params: dict, grads: dict) -> dict:
        """One inner step from ``params`` given the support-loss ``grads``.

        The hook to override for a new inner-loop rule (a learned per-parameter
        rate as in Meta-SGD, say): return new tensors, never modify the inputs.
        Shapes are ``[T, ...]`` for a batch of tasks.
        """
        # theta' = theta - alpha * grad L_support(theta). In first-order mode
        # the gradient carries no graph, so d theta'/d theta = I. One add with
        # alpha, not a multiply and a subtract: per parameter and step, one
        # kernel instead of two, and one in the backward instead of two.
        return {
            k: torch.add(p, grads[k], alpha=-self.inner_lr) for k, p in params.items()
        }

    def adapt(
        self,
        x_support,
        y_support,
        steps: int | None = None,
        params=None,
        first_order: bool | None = None,
    ) -> dict:
        """Adapted parameters ``{name: tensor}`` after ``steps`` SGD steps.

        ``x_support``/``y_support`` are one task ``[K, ...]`` or a batch
        ``[T, K, ...]`` (then every returned tensor has a leading ``[T]``).
        ``steps`` defaults to ``inner_steps`` (use more at test time);
        ``params`` defaults to the model's own parameters and may be an
        earlier ``adapt`` result, to continue from it. The module is never
        modified. Under autograd the result is differentiable w.r.t. the
        model's parameters (through every step unless first order); under
        ``torch.no_grad()`` it is detached and cheaper.
        """
        steps = (
            self.inner_steps
            if steps is None
            else _positive("steps", steps, int, allow_zero=True)
        )
        first_order = self.first_order if first_order is None else first_order
        batched = self._check_pair(x_support, y_support, "x_support", "y_support")
        params = self.params() if params is None else params
        self._check_params_for(params, x_support, batched)
        return self._adapt(
            params, self._buffers(), x_support, y_support, steps, first_order, batched
        )

    def predict(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """f_params(x) for one task or a batch (``params`` from ``adapt``)."""
        batched = self._task_rank(x, "x")
        params_batched = self._check_params_for(params, x, batched)
        return self._forward(params, self._buffers(), x, batched, params_batched)

    def task_losses(self, params: dict, x, y) -> torch.Tensor:
        """Loss of each task ``[T]`` (or a scalar for one task) at ``params``."""
        batched = self._check_pair(x, y, "x", "y")
        params_batched = self._check_params_for(params, x, batched)
        return self._losses(params, self._buffers(), x, y, batched, params_batched)
