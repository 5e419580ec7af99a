"""Speed benchmark: ``python -m mlbook bench``.

Times one meta-iteration (inner steps, outer gradient, outer update) of mlbook
against baselines written here, in one process, on the same data: a plain
per-task autograd loop, a plain ``torch.func`` vmap step (grad inside vmap),
``higher`` when it is installed, and on CUDA each of mlbook and vmap again
with the whole step captured in a CUDA graph (``mlbook.graph``). With
``--compile``, Conv4 MAML also runs as one ``torch.compile``d function written
with ``torch.func`` (a lever tried: compile needs a graph without autograd
calls in it).

Workloads (``--workloads``):

* ``sinusoid``: MAML, MLP 1-40-40-1, meta-batch 25, K = 10, one inner step;
* ``sinusoid-fo``: first-order MAML, otherwise ``sinusoid``;
* ``sinusoid-reptile``: Reptile on the same MLP and tasks, five inner steps
  at 0.02, outer step 0.1 (the sinusoid reproduction's settings);
* ``conv4``: MAML on Omniglot-shaped 5-way 1-shot episodes, Conv4, one inner
  step at 0.4, meta-batch 32 (8 on the CPU), 5 query images per class;
* ``conv4-20w``: MAML 20-way 1-shot, five inner steps at 0.1, meta-batch 16
  (4 on the CPU), 1 query image per class;
* ``conv4-fo``: first-order MAML, otherwise ``conv4``;
* ``conv4-reptile``: Reptile 5-way, 10 images per class, five inner steps at
  0.1, outer step 1.0, meta-batch 5 (the Reptile paper's Omniglot shape).

Images are random (speed does not depend on the pixels). Variants run in
interleaved rounds and the median round is reported, so a busy machine slows
all of them alike. Before timing, every variant's first update is compared
with the per-task loop run in float64 on the same data and device:
``rel err`` is ||update - reference|| / ||reference|| (the meta-gradient for
MAML, the parameter change for Reptile). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .graph import GraphedStep
from .maml import MAML
from .models import MLP, Conv4
from .reproduce import _commit, _machine
from .reptile import Reptile
from .tasks import Sinusoid, TaskBatch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- baselines, written independently of mlbook -----------------------------
def loop_step(w, model, batch, opt):
    """One task at a time with plain autograd (create_graph for second order)."""
    params = dict(model.named_parameters())
    if w["method"] == "reptile":
        return _loop_reptile(w, model, batch)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for t in range(batch.num_tasks):
        fast = params
        for _ in range(w["steps"]):
            out = functional_call(model, fast, (batch.x_support[t],))
            loss = w["loss"](out, batch.y_support[t])
            grads = torch.autograd.grad(
                loss, list(fast.values()), create_graph=w["method"] == "maml"
            )
            fast = {k: p - w["alpha"] * g for (k, p), g in zip(fast.items(), grads)}
        out = functional_call(model, fast, (batch.x_query[t],))
        total = total + w["loss"](out, batch.y_query[t])
    loss = total / batch.num_tasks
    loss.backward()
    opt.step()
    return loss.detach()


def _loop_reptile(w, model, batch):
    params = dict(model.named_parameters())
    moved = {k: torch.zeros_like(p) for k, p in params.items()}
    total = 0.0
    for t in range(batch.num_tasks):
        fast = {k: p.detach().requires_grad_() for k, p in params.items()}
        for _ in range(w["steps"]):
            out = functional_call(model, fast, (batch.x_support[t],))
            loss = w["loss"](out, batch.y_support[t])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {
                k: (p - w["alpha"] * g).detach().requires_grad_()
                for (k, p), g in zip(fast.items(), grads)
            }
        with torch.no_grad():
            total = total + w["loss"](
                functional_call(model, fast, (batch.x_support[t],)), batch.y_support[t]
            )
            for k in moved:
                moved[k] += fast[k] / batch.num_tasks
    with torch.no_grad():
        for k, p in params.items():  # theta += eps (mean phi - theta)
            p.add_(w["outer_lr"] * (moved[k] - p))
    return total / batch.num_tasks


def _func_sgd(w, model):
    """``loss(p, x, y)`` and ``sgd(p, x, y)`` (the workload's inner steps from
    ``p``), written with torch.func for the vmap baselines."""

    def loss(p, x, y):
        return w["loss"](functional_call(model, p, (x,)), y)

    def sgd(p, x, y):
        for _ in range(w["steps"]):
            g = grad(loss)(p, x, y)
            if w["method"] == "fomaml":  # the inner gradient as a constant
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - w["alpha"] * g[k] for k in p}
        return p

    return loss, sgd


def vmap_step(w, model, batch, opt):
    """The textbook torch.func version: grad inside vmap over tasks."""
    loss, sgd = _func_sgd(w, model)
    if w["method"] == "reptile":  # no outer gradient: theta moves towards phi
        params = {k: p.detach() for k, p in model.named_parameters()}

        def adapted(p, xs, ys):
            phi = sgd(p, xs, ys)
            return phi, loss(phi, xs, ys)

        phi, losses = vmap(adapted, in_dims=(None, 0, 0))(
            params, batch.x_support, batch.y_support
        )
        with torch.no_grad():
            for k, p in model.named_parameters():  # theta += eps (mean phi - theta)
                p.add_(w["outer_lr"] * (phi[k].mean(0) - p))
        return losses.mean()

    def task(p, xs, ys, xq, yq):
        return loss(sgd(p, xs, ys), xq, yq)

    opt.zero_grad(set_to_none=True)
    losses = vmap(task, in_dims=(None, 0, 0, 0, 0))(
        dict(model.named_parameters()),
        batch.x_support,
        batch.y_support,
        batch.x_query,
        batch.y_query,
    )
    out = losses.mean()
    out.backward()
    opt.step()
    return out.detach()


def _conv4_losses(params, x, y):
    """Each task's cross-entropy ``[T]`` under Conv4 with per-task weights
    ``[T, ...]`` on ``x: [T, N, C, H, W]``: the tasks' channels side by side
    (one grouped convolution per layer), written out with the Conv4 shape
    fixed so that torch.compile sees only tensors (mlbook's own batched
    forward reads its layer objects, on which compile would guard).
    Plain F.conv2d: traced by torch.compile, mlbook.grouped_conv's Function
    gets wrong second derivatives from torch.func (torch 2.13), so under
    compile grouped_conv2d is F.conv2d anyway."""
    t, n = x.shape[:2]
    h = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])
    for i in range(0, 16, 4):  # conv -> batch norm -> ReLU -> max-pool
        w, b = params[f"features.{i}.weight"], params[f"features.{i}.bias"]
        h = F.conv2d(h, w.flatten(0, 1), b.flatten(), padding=1, groups=t)
        g, beta = params[f"features.{i + 1}.weight"], params[f"features.{i + 1}.bias"]
        h = F.batch_norm(h, None, None, g.flatten(), beta.flatten(), training=True)
        h = F.max_pool2d(F.relu(h), 2)
    h = h.reshape(n, t, -1).transpose(0, 1)  # [T, N, features]
    logits = torch.baddbmm(
        params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2)
    )
    per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return per_example.view(y.shape).mean(1)


def _func_meta_grad(params, xs, ys, xq, yq, alpha, steps, first_order):
    """(meta-loss, meta-gradient) of Conv4 MAML with torch.func only (grad of
    a function that takes grads), so that torch.compile can trace all of it."""

    def support(p):
        return _conv4_losses(p, xs, ys).sum()  # task t's loss sees only p[t]

    def outer(theta):
        p = {k: v.expand(xs.shape[0], *v.shape) for k, v in theta.items()}
        for _ in range(steps):
            g = grad(support)(p)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - alpha * g[k] for k in p}
        loss = _conv4_losses(p, xq, yq).mean()
        return loss, loss

    g, loss = grad(outer, has_aux=True)(params)
    return loss, g


_FUNC_COMPILED = []  # torch.compile(_func_meta_grad), made on first use


def compiled_func_step(w, model, batch, opt):
    """Conv4 (first-order) MAML as one torch.compile'd torch.func function."""
    if not _FUNC_COMPILED:
        _FUNC_COMPILED.append(torch.compile(_func_meta_grad, dynamic=False))
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss, g = _FUNC_COMPILED[0](
        params,
        batch.x_support,
        batch.y_support,
        batch.x_query,
        batch.y_query,
        w["alpha"],
        w["steps"],
        w["method"] == "fomaml",
    )
    for k, p in model.named_parameters():
        p.grad = g[k]
    opt.step()
    return loss


def higher_step(w, model, batch, opt):  # pragma: no cover - optional
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=w["alpha"])
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for t in range(batch.num_tasks):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (f, d):
            for _ in range(w["steps"]):
                d.step(w["loss"](f(batch.x_support[t]), batch.y_support[t]))
            loss = w["loss"](f(batch.x_query[t]), batch.y_query[t]) / batch.num_tasks
            loss.backward()
            total = total + loss.detach()
    opt.step()
    return total


# -- workloads ------------------------------------------------------------------
def _episodes(num_tasks, n_way, k_shot, k_query, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(num_tasks, n_way * k_shot, 1, 28, 28, generator=g)
    xq = torch.rand(num_tasks, n_way * k_query, 1, 28, 28, generator=g)
    ys = torch.arange(n_way).repeat_interleave(k_shot).expand(num_tasks, -1)
    yq = torch.arange(n_way).repeat_interleave(k_query).expand(num_tasks, -1)
    return TaskBatch(xs, ys.contiguous(), xq, yq.contiguous())


WORKLOADS = (
    "sinusoid",
    "sinusoid-fo",
    "sinusoid-reptile",
    "conv4",
    "conv4-20w",
    "conv4-fo",
    "conv4-reptile",
)


def workload(name: str, device, gpu_sizes: bool = False) -> dict:
    """The settings and one fixed batch of a named workload (the meta-batch
    of CUDA runs on CUDA or with ``gpu_sizes``, a smaller one on the CPU)."""
    cuda = device.type == "cuda" or gpu_sizes
    if name in ("sinusoid", "sinusoid-fo", "sinusoid-reptile"):
        batch = Sinusoid().sample(
            25, 10, 10, generator=torch.Generator().manual_seed(0)
        )
        w = dict(
            make=lambda: MLP(1, (40, 40), 1),
            loss=F.mse_loss,
            alpha=0.01,
            steps=1,
            method="fomaml" if name == "sinusoid-fo" else "maml",
            batch=batch,
        )
        if name == "sinusoid-reptile":  # the sinusoid reproduction's settings
            w.update(alpha=0.02, steps=5, method="reptile", outer_lr=0.1)
    elif name in ("conv4", "conv4-fo"):
        w = dict(
            make=lambda: Conv4(1, 5),
            loss=F.cross_entropy,
            alpha=0.4,
            steps=1,
            method="fomaml" if name == "conv4-fo" else "maml",
            batch=_episodes(32 if cuda else 8, 5, 1, 5),
        )
    elif name == "conv4-20w":
        w = dict(
            make=lambda: Conv4(1, 20),
            loss=F.cross_entropy,
            alpha=0.1,
            steps=5,
            method="maml",
            batch=_episodes(16 if cuda else 4, 20, 1, 1),
        )
    elif name == "conv4-reptile":
        w = dict(
            make=lambda: Conv4(1, 5),
            loss=F.cross_entropy,
            alpha=0.1,
            steps=5,
            method="reptile",
            outer_lr=1.0,
            batch=_episodes(5, 5, 10, 0),
        )
    else:
        raise ValueError(f"unknown workload {name!r}")
    w["name"] = name
    w["batch"] = w["batch"].to(device)
    return w


PLAIN_DOUBLE = "mlbook autograd-2nd"
# CUDA's Conv4 step without mlbook.fused_block and the first layer as a
# matmul (its defaults there), nor the compiled passes: the levers' baseline
UNFUSED = "mlbook unfused"
OFF = dict(fused_block=False, one_channel_matmul=False, compiled_passes=False)
ALL_AT_ONCE = "mlbook tasks at once"
NCHW = "mlbook NCHW"
# the "levers combined" experiment: _learner's options, all on
LEVERS = dict(
    fused_block=True,
    one_channel_matmul=True,
    fused_adam=True,
    one_pass_stats=False,
    compiled_passes=False,
)
# CUDA's Conv4 step before its passes differentiated once went through
# torch.compile and the fused block read h once for its statistics: their
# baseline (records/bench-h200-defaults.json)
UNCOMPILED = "uncompiled passes"
UNCOMPILED_OFF = dict(one_pass_stats=False, compiled_passes=False)


class _Baseline:
    """A baseline step in the shape ``GraphedStep`` captures."""

    check_finite = False

    def __init__(self, fn, w, model):
        self.fn, self.w, self.model = fn, w, model

    def step(self, batch, opt):
        return self.fn(self.w, self.model, batch, opt)


def _learner(
    w,
    model,
    conv_impl="grouped",
    channels_last=None,
    plain_norm=False,
    bf16=False,
    compile=False,
    batched_double=None,
    fused_adam=False,
    fused_block=None,
    one_channel_matmul=True,
    task_by_task=None,
    one_pass_stats=True,
    compiled_passes=None,
    shared_first_step=False,
):
    if w["method"] == "reptile":
        out = Reptile(
            model,
            w["loss"],
            inner_lr=w["alpha"],
            inner_steps=w["steps"],
            outer_lr=w["outer_lr"],
            check_finite=False,
            conv_impl=conv_impl,
            compile=compile,
        )
    else:
        out = MAML(
            model,
            w["loss"],
            inner_lr=w["alpha"],
            inner_steps=w["steps"],
            first_order=w["method"] == "fomaml",
            check_finite=False,
            conv_impl=conv_impl,
            compile=compile,
        )
    out._channels_last, out._plain_norm = channels_last, plain_norm
    out._batched_double = batched_double
    out._task_by_task = task_by_task
    out._fused_block, out._one_channel_matmul = fused_block, one_channel_matmul
    out._one_pass_stats = one_pass_stats
    out._compiled_passes = compiled_passes
    out._shared_first_step = shared_first_step
    out.fused_adam = fused_adam or None  # read by _setup
    return _Autocast(out) if bf16 else out


class _Autocast:
    """A learner whose step runs under bfloat16 autocast (an experiment)."""

    check_finite = False

    def __init__(self, learner):
        self.learner, self.model = learner, learner.model

    def step(self, batch, opt):
        # cache_enabled=False: cached casts would outlive a CUDA-graph capture
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.learner.step(batch, opt)


def variants(w, device, experiments=False) -> dict:
    """label -> (make_stepper(model), graphed?). A stepper has ``step(batch, opt)``."""
    conv = w["name"].startswith("conv4")

    def learner(*args, graphed=False, **options):  # mlbook's step, these options
        return (lambda m: _learner(w, m, *args, **options), graphed)

    def baseline(step, graphed=False):  # a step written in this module
        return (lambda m: _Baseline(step, w, m), graphed)

    if experiments:  # levers tried on the graphed mlbook step (CUDA only)
        return {
            "mlbook + graph": learner(graphed=True),
            UNFUSED + " + graph": learner(graphed=True, **OFF),
            # the fused block in the query pass too (and in first-order ones)
            "fused every pass + graph": learner(graphed=True, fused_block=True),
            # the default step without its compiled passes and one-pass
            # statistics, and without the second alone
            UNCOMPILED + " + graph": learner(graphed=True, **UNCOMPILED_OFF),
            "two-pass stats + graph": learner(graphed=True, one_pass_stats=False),
            # the first inner step's convolutions dense over all tasks'
            # examples (every task starts from theta): grouped_conv.shared_conv2d
            "shared first step + graph": learner(graphed=True, shared_first_step=True),
            "mlbook fused Adam + graph": learner(graphed=True, fused_adam=True),
            "NHWC + graph": learner(graphed=True, channels_last=True),
            "plain BN + graph": learner(graphed=True, plain_norm=True),
            "bf16 + graph": learner(graphed=True, bf16=True),
            "bf16 NHWC + graph": learner(graphed=True, channels_last=True, bf16=True),
            "bmm bf16 + graph": learner("bmm", graphed=True, bf16=True),
            "fused Adam + graph": learner(graphed=True, fused_adam=True, **OFF),
            # each lever alone: mlbook.fused_block (every pass), and the first
            # layer as one batched matmul
            "fused block + graph": learner(
                graphed=True, fused_block=True, one_channel_matmul=False
            ),
            "conv1 matmul + graph": learner(
                graphed=True, fused_block=False, one_channel_matmul=True
            ),
            "levers combined + graph": learner(graphed=True, **LEVERS),
            # the same with every convolution as unfold + bmm: with TF32
            # matmuls (--tf32) the precision cuDNN's convolutions have here
            "levers bmm + graph": learner("bmm", graphed=True, **LEVERS),
            "per-task loop": baseline(loop_step),
        }
    out = {"mlbook": learner()}
    sinusoid = w["name"].startswith("sinusoid")
    if w.get("compile") and device.type == "cpu" and sinusoid:
        # only the MLP's closed-form step is compiled (mlbook.mlp_grad)
        out["mlbook compiled"] = learner(compile=True)
    # the same step with autograd's double backward of the grouped convolution
    # (what mlbook.grouped_conv replaces): the lever's own baseline
    double = conv and w["method"] == "maml" and device.type == "cuda"
    if double:
        out[PLAIN_DOUBLE] = learner(batched_double=False)
    if conv and device.type == "cpu":
        # The CPU's Conv4 step before channels-last activations in the passes
        # differentiated once and the first layer as a matmul: their baseline
        out[NCHW] = learner(channels_last=False, one_channel_matmul=False)
    if conv and device.type == "cpu" and w["method"] == "reptile":
        # On the CPU Conv4 takes a batch one task at a time (MAML's step splits
        # the meta-batch so anyway); Reptile's step all tasks at once, as on
        # CUDA, is that choice's own baseline
        out[ALL_AT_ONCE] = learner(task_by_task=False)
    if conv:
        out["mlbook bmm"] = learner("bmm")
    if w.get("compile") and conv and w["method"] != "reptile":
        out["compiled torch.func"] = baseline(compiled_func_step)
    out["torch.func vmap"] = baseline(vmap_step)
    out["per-task loop"] = baseline(loop_step)
    if w["method"] == "maml":
        try:
            import higher  # noqa: F401

            out["higher"] = baseline(higher_step)
        except ImportError:
            pass
    if device.type == "cuda":
        out["mlbook + graph"] = learner(graphed=True)
        if double:
            out[PLAIN_DOUBLE + " + graph"] = learner(graphed=True, batched_double=False)
        if conv:
            out[UNFUSED + " + graph"] = learner(graphed=True, **OFF)
            out[UNCOMPILED + " + graph"] = learner(graphed=True, **UNCOMPILED_OFF)
            out["mlbook bmm + graph"] = learner("bmm", graphed=True)
        out["vmap + graph"] = baseline(vmap_step, graphed=True)
        if w.get("compile") and conv and w["method"] != "reptile":
            out["compiled torch.func + graph"] = baseline(compiled_func_step, True)
    return out


def _setup(w, make_stepper, graphed, device, dtype=torch.float32, batch=None):
    torch.manual_seed(0)
    model = w["make"]().to(device=device, dtype=dtype)
    stepper = make_stepper(model)
    # a stepper may ask for the fused Adam kernel (an experiment)
    fused = getattr(stepper, "fused_adam", None)
    opt = (
        None
        if w["method"] == "reptile"
        else torch.optim.Adam(
            model.parameters(), lr=1e-3, capturable=graphed, fused=fused
        )
    )
    batch = w["batch"] if batch is None else batch
    if graphed:
        g = GraphedStep(stepper, opt, batch)
        return model, (lambda b: g(b))
    return model, (lambda b: stepper.step(b, opt))


def _update(w, model, run, batch):
    """The first update's direction: meta-gradient, or Reptile's weight change."""
    before = [p.detach().clone() for p in model.parameters()]
    run(batch)
    if w["method"] == "reptile":
        vec = [p.detach() - b for p, b in zip(model.parameters(), before)]
    else:
        vec = [p.grad for p in model.parameters()]
    return torch.cat([v.double().flatten() for v in vec])


def accuracy(w, device, labels, experiments=False) -> dict:
    """Relative error of each variant's first update vs the float64 loop."""
    vs = variants(w, device, experiments)
    b = w["batch"]
    b64 = TaskBatch(b.x_support.double(), b.y_support, b.x_query.double(), b.y_query)
    if w["name"].startswith("sinusoid"):
        b64 = TaskBatch(
            *(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query))
        )
    model, run = _setup(w, vs["per-task loop"][0], False, device, torch.float64, b64)
    ref = _update(w, model, run, b64)
    errors = {}
    for label in labels:
        make, graphed = vs[label]
        try:
            model, run = _setup(w, make, graphed, device)
            got = _update(w, model, run, b)
        except Exception as e:  # noqa: BLE001 - reported, and the variant dropped
            errors[label] = e
            continue
        errors[label] = ((got - ref).norm() / ref.norm()).item()
    return errors


def run_workload(
    w, device, rounds, round_seconds=0.25, skip=(), experiments=False, only=None
):
    vs = {
        k: v
        for k, v in variants(w, device, experiments).items()
        if k not in skip and (only is None or k in only)
    }
    errors = accuracy(w, device, list(vs), experiments)
    for label, e in list(errors.items()):
        if isinstance(e, Exception):
            print(
                f"{w['name']}: {label} failed and is left out: {type(e).__name__}: {e}",
                flush=True,
            )
            del vs[label], errors[label]
    batch = w["batch"]
    setups, memory, per_round = {}, {}, {}
    for label, (make, graphed) in vs.items():  # warm-up, peak memory, round size
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _, run = _setup(w, make, graphed, device)
        for _ in range(3):
            run(batch)
        _sync(device)
        start = time.perf_counter()
        run(batch)
        _sync(device)
        one = time.perf_counter() - start
        per_round[label] = max(1, min(200, int(round_seconds / max(one, 1e-6))))
        if device.type == "cuda":
            memory[label] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        setups[label] = run
    times = {label: [] for label in setups}
    for _ in range(rounds):
        for label, run in setups.items():
            n = per_round[label]
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                run(batch)
            _sync(device)
            times[label].append((time.perf_counter() - start) / n)
    base = (
        statistics.median(times["per-task loop"]) if "per-task loop" in times else None
    )
    rows = []
    for label, ts in times.items():
        sec = statistics.median(ts)
        rows.append(
            dict(
                workload=w["name"],
                method=w["method"],
                variant=label,
                ms_per_step=1e3 * sec,
                steps_per_s=1 / sec,
                tasks_per_s=batch.num_tasks / sec,
                speedup_vs_loop=(base / sec) if base else None,
                peak_mib=memory.get(label),
                rel_err_vs_float64=errors[label],
                rounds=rounds,
                steps_per_round=per_round[label],
                num_tasks=batch.num_tasks,
                inner_steps=w["steps"],
            )
        )
    return rows


def profile(w, device, steps=3, levers=False) -> str:
    """Where the GPU time of one eager mlbook step goes: the top kernels by
    device time, and how many kernels one step launches. ``levers``: the step
    of the "levers combined" experiment instead."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, run = _setup(
        w, lambda m: _learner(w, m, **(LEVERS if levers else {})), False, device
    )
    for _ in range(3):
        run(w["batch"])
    _sync(device)
    with torch_profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(steps):
            run(w["batch"])
        _sync(device)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total_us = sum(e.device_time for e in kernels) if kernels else 0.0
    try:
        table = events.table(sort_by="device_time_total", row_limit=14)
        # and the operators/kernels that themselves take the time
        table += "\n" + events.table(sort_by="self_device_time_total", row_limit=40)
    except Exception:  # noqa: BLE001 - older names
        table = events.table(sort_by="cuda_time_total", row_limit=14)
    return (
        f"{w['name']}{' (levers combined)' if levers else ''}: "
        f"{len(kernels) / steps:.0f} kernels per step, "
        f"{total_us / steps / 1e3:.2f} ms of kernel time per step\n{table}"
    )


# views and allocations: no kernel of their own
_NO_KERNEL = {
    "aten::" + n
    for n in (
        "view _unsafe_view _reshape_alias reshape t transpose permute expand "
        "expand_as unsqueeze squeeze as_strided alias select slice unbind split "
        "split_with_sizes detach flatten empty empty_strided empty_like "
        "resize_ lift_fresh result_type is_nonzero item _local_scalar_dense "
        "contiguous set_"
    ).split()
}


def count_ops(w, device, levers=False) -> dict:
    """What one MAML meta-gradient (meta-loss and backward, no optimizer)
    dispatches in the form it takes on CUDA: all tasks in one pass, second
    derivatives through mlbook.grouped_conv. Counted with torch.profiler on
    any device, the CPU included: ATen operations that would launch work
    (views, allocations and host scalars left out; an operation inside
    another is not counted again), calls into compiled code (mlbook.fused_block,
    a few kernels each), and the elements those operations take as input
    (compiled code's not included). A proxy for a GPU step's kernel launches
    and memory traffic, not a timing. ``w``: a Conv4 MAML workload,
    ``workload("conv4", device, gpu_sizes=True)`` say; ``levers``:
    mlbook.fused_block in every pass and the first layer as a matmul, else
    neither (``UNFUSED``). Both counts leave out the levers CUDA's default
    added later (compiled passes differentiated once, one-pass statistics), so
    they count the fused block and the matmul only, not today's CUDA step
    (which has both, the block in the support pass only). Returns the counts
    as a dict; ``book/09_tools`` explains the count."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if w["method"] != "maml" or not w["name"].startswith("conv4"):
        raise ValueError(f"count_ops takes a Conv4 MAML workload, not {w['name']!r}")
    torch.manual_seed(0)
    on = LEVERS if levers else OFF  # (fused Adam among them: no optimizer here)
    # all tasks in one pass, as on CUDA (the CPU's default is one at a time)
    model = w["make"]().to(device)
    learner = _learner(
        w, model, batched_double=True, task_by_task=False, channels_last=False, **on
    )

    def run():
        learner.meta_loss(w["batch"]).backward()

    for _ in range(3):  # compiles mlbook.fused_block's shapes first
        run()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()

    def compiled_call(e):
        # a call into a compiled function, or autograd running the backward
        # of one: the profiler's names for them since torch 2.4 (the inner
        # "## Call CompiledFxGraph" events appear in later releases only)
        region = e.name.startswith("Torch-Compiled Region")
        return region or e.name == "CompiledFunctionBackward"

    def nested(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::") or compiled_call(p):
                return True
            p = p.cpu_parent
        return False

    ops = compiled = elements = 0
    for e in prof.events():
        if compiled_call(e):
            compiled += 1
        elif e.name.startswith("aten::") and e.name not in _NO_KERNEL:
            source = e.input_shapes[0] if e.input_shapes else []
            if e.name == "aten::to" and not source:
                continue  # a Python number made a tensor: host work
            if not nested(e):
                ops += 1
                for shape in e.input_shapes:
                    if isinstance(shape, list) and all(type(d) is int for d in shape):
                        elements += math.prod(shape)
    return dict(
        workload=w["name"],
        variant="levers combined" if levers else UNFUSED,
        num_tasks=w["batch"].num_tasks,
        ops=ops,
        compiled_calls=compiled,
        m_elements_in=elements / 1e6,
    )


RECORDS = Path(__file__).parent / "records"


def records() -> list[str]:
    """Names of the shipped benchmark records: ``bench-h200*`` timed on an
    NVIDIA H200, ``bench-cpu*`` on a two-core CPU; each holds the command that
    produced it. Read by ``book/09_tools``."""
    return sorted(p.stem for p in RECORDS.glob("*.json"))


def load_record(name: str) -> dict:
    """One shipped benchmark record, e.g. ``load_record("bench-h200")``, as
    ``book/09_tools`` loads them."""
    path = RECORDS / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no benchmark record {name!r}; available: {records()}")
    return json.loads(path.read_text())


def format_rows(rows, compact: bool = False) -> str:
    """The benchmark table; ``compact`` leaves out steps/s and tasks/s (for
    narrow pages)."""
    cols = [
        ("ms/step", 9),
        ("steps/s", 9),
        ("tasks/s", 9),
        ("x loop", 7),
        ("peak MiB", 9),
        ("rel err", 8),
    ]
    if compact:
        cols = [c for c in cols if c[0] not in ("steps/s", "tasks/s")]
    # the name columns as wide as their longest entry, 14 and 19 at least
    first = max([14] + [len(r["workload"]) for r in rows])
    wide = max([19] + [len(r["variant"]) for r in rows])
    head = f"{'workload':<{first}} {'variant':<{wide}} " + " ".join(
        f"{name:>{width}}" for name, width in cols
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cell = {
            "ms/step": f"{r['ms_per_step']:.2f}",
            "steps/s": f"{r['steps_per_s']:.1f}",
            "tasks/s": f"{r['tasks_per_s']:.0f}",
            "x loop": f"{r['speedup_vs_loop']:.1f}" if r["speedup_vs_loop"] else "-",
            "peak MiB": f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a",
            "rel err": f"{r['rel_err_vs_float64']:.1e}",
        }
        lines.append(
            f"{r['workload']:<{first}} {r['variant']:<{wide}} "
            + " ".join(f"{cell[name]:>{width}}" for name, width in cols)
        )
    return "\n".join(lines)


def _count_main(p, args, device, argv):
    """``--count-ops``: count_ops for each Conv4 MAML workload, printed and
    written as JSON."""
    import sys

    rows = []
    for name in (args.workloads or "conv4,conv4-20w").split(","):
        try:
            w = workload(name, device, gpu_sizes=True)
            rows += [count_ops(w, device, levers) for levers in (False, True)]
        except ValueError as e:
            p.error(str(e))
    head = f"{'workload':<10} {'variant':<16} {'tasks':>5} {'ops':>6} "
    head += f"{'compiled':>8} {'M elements in':>13}"
    print(f"{head}\n{'-' * len(head)}")
    for r in rows:
        print(
            f"{r['workload']:<10} {r['variant']:<16} {r['num_tasks']:>5} "
            f"{r['ops']:>6} {r['compiled_calls']:>8} {r['m_elements_in']:>13.0f}"
        )
    record = dict(
        command="python -m mlbook bench "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        commit=_commit(),
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        what=" ".join(count_ops.__doc__.split()),
        op_counts=rows,
    )
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"(written to {args.out})")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlbook bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda if present)"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated (default: the three sinusoid workloads and conv4 "
        "on the CPU; all seven on CUDA)",
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--round-seconds",
        type=float,
        default=0.25,
        help="about how long one round of one variant runs",
    )
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    p.add_argument(
        "--only", default="", help="comma-separated variants to run (and no other)"
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="let float32 matrix products use TF32 (convolutions on "
        "CUDA use it by default in PyTorch)",
    )
    p.add_argument(
        "--experiments",
        action="store_true",
        help="CUDA: time levers on the graphed step instead (channels-"
        "last, plain-op batch norm, bfloat16 autocast, fused Adam, "
        "mlbook.fused_block, the first convolution as a matmul, the "
        "block's statistics in one read, passes differentiated once "
        "through torch.compile)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its algorithms and pick the fastest",
    )
    p.add_argument(
        "--no-tf32-conv",
        action="store_true",
        help="full float32 convolutions on CUDA (PyTorch's default is TF32)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print where one eager mlbook step spends GPU time",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add the compiled variants: for the sinusoid workloads on the CPU, "
        "mlbook with compile=True (torch.compile of the closed-form MLP "
        "meta-gradient and the Adam update, or of the Reptile step, as one "
        "call; compiling takes some 20 s); for Conv4 MAML, the whole "
        "meta-gradient written with torch.func and compiled (minutes to "
        "compile on the CPU). Compile time is not timed",
    )
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of timing: count what one Conv4 MAML meta-gradient "
        "dispatches in its CUDA form, with and without the levers (operations, "
        "compiled calls, elements read; see count_ops), on any device; "
        "workloads conv4,conv4-20w by default",
    )
    p.add_argument("--out", default="bench.json", help="where to write the JSON")
    args = p.parse_args(argv)
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no GPU is visible")
    torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    cuda = device.type == "cuda"
    if args.experiments and not cuda:
        p.error("--experiments needs CUDA")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.no_tf32_conv:
        torch.backends.cudnn.allow_tf32 = False
    names = (
        args.workloads
        or (
            ",".join(WORKLOADS)
            if cuda
            else "sinusoid,sinusoid-fo,sinusoid-reptile,conv4"
        )
    ).split(",")
    if args.count_ops:
        return _count_main(p, args, device, argv)
    skip = tuple(s for s in args.skip.split(",") if s)
    only = tuple(s for s in args.only.split(",") if s) or None
    loads = []
    for name in names:
        try:
            w = workload(name, device)
        except ValueError as e:
            p.error(str(e))
        w["compile"] = args.compile
        loads.append(w)
    known = {k for w in loads for k in variants(w, device, args.experiments)}
    unknown = sorted(set(only or ()) - known)
    if unknown:  # a typo would otherwise time nothing
        p.error(f"no variant named {unknown}; these workloads have {sorted(known)}")
    import sys

    dev = torch.cuda.get_device_name(device) if cuda else _machine()
    record = dict(
        command="python -m mlbook bench "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        commit=_commit(),
        device=str(device),
        device_name=dev,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cudnn_benchmark=args.cudnn_benchmark,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_conv=torch.backends.cudnn.allow_tf32 if cuda else None,
        rows=[],
    )
    if args.profile:
        record["profiles"] = []

    def write():
        # after every workload: a run stopped by a time limit keeps the rows
        # (and profiles) of the workloads it finished
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    rows = record["rows"]
    for w in loads:
        name = w["name"]
        rows += run_workload(
            w, device, args.rounds, args.round_seconds, skip, args.experiments, only
        )
        print(format_rows([r for r in rows if r["workload"] == name]), flush=True)
        write()
        for levers in [False, True] if args.experiments else [False]:
            if args.profile:
                try:
                    text = profile(w, device, levers=levers)
                except Exception as e:  # noqa: BLE001 - a missing profiler is no failure
                    text = f"profile of {name} failed: {type(e).__name__}: {e}"
                print(text, flush=True)
                record["profiles"].append(dict(workload=name, levers=levers, text=text))
                write()
    print(
        f"\ndevice: {device} ({dev}); torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; TF32 matmul "
        f"{torch.backends.cuda.matmul.allow_tf32}, TF32 conv "
        f"{torch.backends.cudnn.allow_tf32 if cuda else 'n/a'}; cudnn.benchmark "
        f"{args.cudnn_benchmark}"
    )
    print(format_rows(rows))
    write()
    print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
