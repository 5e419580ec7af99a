"""Meta-training and evaluation loops: progress bars, seeding, devices,
checkpoints that resume, and results as mean +- 95% interval.

Introduced in ``book/04_maml``; every chapter that trains uses them.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path

import torch
from torch.func import vmap
from tqdm.auto import tqdm

from .graph import GraphedStep
from .inner import _positive
from .tasks import TaskBatch

__all__ = ["meta_train", "evaluate", "EvalResult", "TrainResult", "default_device"]


def default_device() -> torch.device:
    """CUDA when it is present, else the CPU (what ``meta_train`` and the
    Omniglot runs of ``book/07_few_shot_images`` pick)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    """What ``meta_train`` returns: the loss of every meta-iteration run so far
    and the training wall time, both including the earlier part of a resumed
    run (``resumed_from`` says where this call started). Introduced in
    ``book/03_tasks``."""

    losses: list = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    resumed_from: int = 0


def _label(learner) -> str:
    # The progress bar's name for the method: first-order MAML is a MAML
    # object, and Reptile (first order too) its own class.
    name = type(learner).__name__
    if name == "MAML" and getattr(learner, "first_order", False):
        return "first-order MAML"
    return name


def _save_atomic(obj, path: Path):
    # Write to a fresh temporary file and rename, so an interruption never
    # leaves a half-written checkpoint where a good one was (and no file of
    # the user's is taken for the temporary one).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _settings(learner, tasks) -> dict:
    """What a checkpoint must agree on besides the sampling: the learner's
    hyper-parameters and the task distribution (a dataclass's repr names its
    ranges; anything else, its type, and its ``fingerprint()`` when it has
    one, as ``FewShot`` does: a hash of its images)."""
    out = {}
    for key in ("inner_lr", "inner_steps", "first_order", "outer_lr"):
        value = getattr(learner, key, None)
        if isinstance(value, (bool, int, float)):
            out[key] = value
    out["tasks"] = repr(tasks) if is_dataclass(tasks) else type(tasks).__name__
    if callable(getattr(tasks, "fingerprint", None)):
        # (a key of its own: checkpoints made before it resume as before)
        out["tasks_data"] = tasks.fingerprint()
    return out


def _load_checkpoint(path: Path, device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: say which
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is "
            "damaged or not an mlbook checkpoint: move it away or use another path"
        ) from err
    keys = {"iteration", "config", "model", "optimizer", "generator", "losses"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(
            f"{path} is not a meta_train checkpoint (it lacks "
            f"{sorted(keys - set(state)) if isinstance(state, dict) else 'a dict'}); "
            "use another path"
        )
    return state


def _plain(value):
    """An optimizer setting as plain Python (a tensor lr as its number)."""
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _check_resume(path, state, config, model, optimizer, trained, iterations):
    """Everything a resume would load must fit, checked before anything is."""
    stored = state["config"]
    common = set(stored) & set(config)  # (older checkpoints store fewer keys)
    differ = {
        k: (stored[k], config[k]) for k in sorted(common) if stored[k] != config[k]
    }
    if differ:
        said = ", ".join(
            f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items()
        )
        raise ValueError(
            f"checkpoint {path} was made with other settings ({said}); "
            "use another path for this run"
        )
    if state["iteration"] > iterations:
        raise ValueError(
            f"checkpoint {path} is at iteration {state['iteration']}, past the "
            f"{iterations} asked for; ask for at least that many or use another path"
        )
    mine = model.state_dict()
    theirs = state["model"]
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ValueError(
            f"checkpoint {path} holds another model (its parameters' names or "
            "shapes differ from this one's); use another path"
        )
    saved_opt = state["optimizer"]
    if (optimizer is None) != (saved_opt is None):
        raise ValueError(f"checkpoint {path} was made with a different optimizer setup")
    if optimizer is not None:
        sizes = [len(g["params"]) for g in saved_opt["param_groups"]]
        if sizes != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(
                f"checkpoint {path}: the optimizer's parameter groups differ"
            )
        for g, h in zip(optimizer.param_groups, saved_opt["param_groups"]):
            # load_state_dict would put the checkpoint's settings (lr, betas,
            # weight_decay, ...) in place of this optimizer's: refuse instead.
            # Keys one torch release has and another lacks are not compared.
            differ = [
                f"{k}: {_plain(h[k])!r} there, {_plain(g[k])!r} here"
                for k in sorted(set(g) & set(h) - {"params"})
                if _plain(g[k]) != _plain(h[k])
            ]
            if differ:
                raise ValueError(
                    f"checkpoint {path} was trained with other optimizer settings "
                    f"({', '.join(differ)}); resuming would replace this "
                    "optimizer's with the checkpoint's: use another path for new "
                    "settings"
                )
    extra = state.get("trained", [])
    if len(extra) != len(trained) or any(
        a.shape != b.shape for a, b in zip(extra, trained)
    ):
        raise ValueError(
            f"checkpoint {path}: the tensors trained beside the model differ"
        )


def meta_train(
    learner,
    tasks,
    iterations: int,
    num_tasks: int = 25,
    k_support: int = 10,
    k_query: int = 10,
    outer_lr: float = 1e-3,
    optimizer=None,
    seed: int = 0,
    device=None,
    checkpoint=None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    cuda_graph: bool = False,
) -> TrainResult:
    """Meta-train ``learner`` (MAML, Reptile or Pretrained) on ``tasks``.

    Each iteration samples ``num_tasks`` tasks with ``k_support`` + ``k_query``
    points from ``tasks`` (anything with ``sample(num_tasks, k_support, k_query,
    generator=, device=)``) and calls ``learner.meta_step``. Learners that use an
    optimizer get Adam(``outer_lr``) unless ``optimizer`` is given.

    Tasks come from a generator seeded with ``seed``. With ``checkpoint`` (a
    path), the model, optimizer (and any tensor it trains beside the model),
    generator and loss history are saved every ``checkpoint_every`` iterations
    and at the end; an existing checkpoint is resumed (``resume=True``) so an
    interrupted run ends exactly where an uninterrupted one would. A
    checkpoint made with other settings (sampling, the learner's
    hyper-parameters, the task distribution (for ``FewShot``, its images),
    the model, the optimizer or any of its settings), or one past
    ``iterations``, is refused before anything is loaded. ``resume=False``
    refuses to overwrite an existing file. A
    non-finite meta-loss stops the run with ``FloatingPointError`` before
    anything more is saved. ``learner.model`` is moved to ``device`` (default: CUDA when
    present); tensors a learner subclass keeps beside the model (learned
    inner rates, say) are not moved: pass ``device`` where they live.

    ``cuda_graph=True`` (CUDA only) records one whole meta-step in a CUDA graph
    at the first iteration and replays it after (``mlbook.graph``): same
    updates, a fraction of the launch overhead. The default optimizer is then
    built with ``capturable=True``; one you pass must be too.

    Introduced in ``book/03_tasks`` (the outer loop it runs).
    """
    iterations = _positive("iterations", iterations, int, allow_zero=True)
    _positive("num_tasks", num_tasks, int)
    _positive("k_support", k_support, int)
    _positive("k_query", k_query, int, allow_zero=True)
    _positive("checkpoint_every", checkpoint_every, int)
    _positive("outer_lr", outer_lr)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not hasattr(learner, "model") or not hasattr(learner, "meta_step"):
        raise TypeError(
            f"learner must be an mlbook learner (MAML, Reptile, Pretrained), "
            f"got {type(learner).__name__}"
        )
    if not hasattr(tasks, "sample"):
        raise TypeError("tasks must have sample(num_tasks, k_support, k_query, ...)")
    device = torch.device(device) if device is not None else default_device()
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if cuda_graph and not hasattr(learner, "step"):
        raise TypeError(f"{type(learner).__name__} has no step() to capture")
    model = learner.model.to(device)
    if optimizer is None and learner.uses_optimizer:
        # The fused kernel updates all tensors in one call: for small models
        # the per-tensor Python loop of the default Adam is a visible cost.
        # A graph replays the step anyway, but needs a capturable optimizer.
        lr = _positive("outer_lr", outer_lr)
        optimizer = (
            torch.optim.Adam(model.parameters(), lr=lr, capturable=True)
            if cuda_graph
            else torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        )
    if cuda_graph and optimizer is not None and not all(
        g.get("capturable", False) for g in optimizer.param_groups
    ):
        raise ValueError(
            "cuda_graph=True needs an optimizer built with capturable=True, e.g. "
            "torch.optim.Adam(params, lr, capturable=True)"
        )
    generator = torch.Generator().manual_seed(seed)
    config = dict(
        learner=type(learner).__name__,
        num_tasks=num_tasks,
        k_support=k_support,
        k_query=k_query,
        seed=seed,
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
        **_settings(learner, tasks),
    )
    # Tensors the optimizer trains outside the model (a learned inner rate):
    # saved and restored beside it.
    in_model = {id(p) for p in model.parameters()}
    trained = [
        p
        for g in (optimizer.param_groups if optimizer is not None else [])
        for p in g["params"]
        if id(p) not in in_model
    ]
    result = TrainResult()

    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        if not resume:
            raise FileExistsError(
                f"checkpoint {path} exists; pass resume=True to continue it, or "
                "choose another path (mlbook never overwrites a checkpoint)"
            )
        state = _load_checkpoint(path, device)
        _check_resume(path, state, config, model, optimizer, trained, iterations)
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for p, v in zip(trained, state.get("trained", [])):
                p.copy_(v)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        result.losses = list(state["losses"])
        result.resumed_from = state["iteration"]
        earlier_seconds = state.get("seconds", 0.0)
        if progress:
            print(f"resuming {path} at iteration {state['iteration']}", file=sys.stderr)
    elif path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path is None or not path.exists():
        earlier_seconds = 0.0

    def save(iteration):
        _save_atomic(
            dict(
                iteration=iteration,
                config=config,
                model=model.state_dict(),
                optimizer=optimizer.state_dict() if optimizer is not None else None,
                generator=generator.get_state(),
                torch_rng=torch.get_rng_state(),
                losses=result.losses,
                trained=[p.detach() for p in trained],
                seconds=earlier_seconds + time.perf_counter() - start,
            ),
            path,
        )

    start = time.perf_counter()
    first = result.resumed_from
    bar = tqdm(
        range(first, iterations),
        initial=first,
        total=iterations,
        disable=not progress,
        mininterval=1.0,
        file=sys.stderr,
        desc=_label(learner),
    )
    graphed, pending = None, []

    def flush(done):
        values = torch.stack(pending).tolist()
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(
                    f"meta-loss {v} at iteration {done - len(values) + i + 1}: "
                    "training diverged"
                )
        result.losses.extend(values)

    for it in bar:
        batch = tasks.sample(
            num_tasks, k_support, k_query, generator=generator, device=device
        )
        if cuda_graph:
            if hasattr(learner, "prepare_step"):  # host-side settings first
                learner.prepare_step()
            if graphed is None:
                graphed = GraphedStep(learner, optimizer, batch)
            # No host sync here: while the GPU replays this step, the CPU
            # already samples the next episode. Losses are read in chunks.
            pending.append(graphed(batch).clone())
            if len(pending) == 50 or it + 1 == iterations or (
                path is not None and (it + 1) % checkpoint_every == 0
            ):
                flush(it + 1)
        else:
            loss = learner.meta_step(batch, optimizer)
            if not math.isfinite(loss):  # (before any checkpoint could keep it)
                raise FloatingPointError(
                    f"meta-loss {loss} at iteration {it + 1}: training diverged"
                )
            result.losses.append(loss)
        if progress and (it + 1) % 100 == 0:
            recent = result.losses[-100:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
        if path is not None and (it + 1) % checkpoint_every == 0:
            save(it + 1)
    bar.close()
    if path is not None and (first < iterations or not path.exists()):
        save(max(iterations, first))
    result.seconds = earlier_seconds + time.perf_counter() - start
    result.iterations = len(result.losses)
    return result


@dataclass
class EvalResult:
    """Metric after each number of adaptation steps over a fixed set of tasks.

    ``values[i]`` holds the per-task metric after ``steps[i]`` steps; ``mean``
    and ``ci95`` summarise it (95% interval: 1.96 standard errors). Tasks whose
    adaptation diverged (NaN or infinite metric; only kept when ``evaluate``
    was called with ``allow_diverged=True``) are left out of both and counted
    in ``diverged``: always report that count beside the mean. Introduced in
    ``book/02_meta_vs_transfer``.
    """

    steps: list
    metric: str
    values: torch.Tensor  # [len(steps), tasks]

    @property
    def diverged(self) -> list:
        """How many tasks have a NaN or infinite metric, per entry of ``steps``."""
        return (~torch.isfinite(self.values)).sum(1).tolist()

    def _finite(self, i):
        row = self.values[i]
        return row[torch.isfinite(row)]

    @property
    def mean(self) -> list:
        """Mean metric over the (finite) tasks, one value per entry of ``steps``."""
        return [self._finite(i).mean().item() for i in range(len(self.steps))]

    @property
    def ci95(self) -> list:
        """The half-width of each step's 95% interval of the mean, which is
        1.96 standard errors (NaN for fewer than two tasks)."""
        out = []
        for i in range(len(self.steps)):
            v = self._finite(i)
            n = v.numel()
            out.append(1.96 * v.std().item() / math.sqrt(n) if n > 1 else float("nan"))
        return out

    def at(self, steps: int) -> tuple[float, float]:
        """(mean, ci95) after ``steps`` steps."""
        i = self.steps.index(steps)
        return self.mean[i], self.ci95[i]

    def as_dict(self) -> dict:
        """Metric, task count, steps, means, intervals and diverged counts."""
        return {
            "metric": self.metric,
            "tasks": self.values.shape[1],
            "steps": self.steps,
            "mean": self.mean,
            "ci95": self.ci95,
            "diverged": self.diverged,
        }

    def agrees_with(self, record: dict, rtol: float = 0.02) -> list:
        """Compare with a stored evaluation of the same tasks (``as_dict``'s
        form, which the shipped records keep).

        Returns ``(mean here, diverged here, agrees)`` for each of the
        record's steps. A step agrees when the diverged counts differ by at
        most one and, if they are equal, the means by at most ``rtol`` of the
        record's mean plus half its 95% interval. (Another machine rounds
        differently, and ten steps of SGD amplify that: a task near the edge
        may diverge on one machine and not the other, and then moves the
        mean by more than any tolerance that would still catch a real
        change.)
        """
        if record.get("metric", self.metric) != self.metric:
            raise ValueError(
                f"the record holds {record['metric']!r}, this evaluation "
                f"{self.metric!r}"
            )
        tasks = self.values.shape[1]
        if record.get("tasks", tasks) != tasks:
            raise ValueError(
                f"the record was taken over {record['tasks']} tasks, this "
                f"evaluation over {tasks}: evaluate the same tasks"
            )
        missing = [s for s in record["steps"] if s not in self.steps]
        if missing:
            raise ValueError(
                f"the record has steps {missing} that this evaluation lacks "
                f"(it has {self.steps})"
            )
        means, counts = self.mean, self.diverged
        stored = zip(
            record["steps"],
            record["mean"],
            record["ci95"],
            record.get("diverged", [0] * len(record["steps"])),
        )
        rows = []
        for s, m, c, d in stored:
            mean, d_here = means[self.steps.index(s)], counts[self.steps.index(s)]
            same_mean = abs(mean - m) <= rtol * abs(m) + 0.5 * c
            agrees = abs(d_here - d) <= 1 and (d_here != d or same_mean)
            rows.append((mean, d_here, agrees))
        return rows

    def __str__(self):
        rows = [f"{self.metric} over {self.values.shape[1]} tasks"]
        for s, m, c, d in zip(self.steps, self.mean, self.ci95, self.diverged):
            note = f"  ({d} diverged, left out)" if d else ""
            label = "1 step" if s == 1 else f"{s} steps"
            rows.append(f"  {label:>9}: {m:.4f} +- {c:.4f}{note}")
        return "\n".join(rows)


def _accuracy(pred, y):  # [T]
    # Class scores [T, N, classes] against integer labels [T, N]; anything else
    # (a regression, a label past the last class) would give a meaningless 0.
    if y.is_floating_point() or pred.dim() != y.dim() + 1 or pred.shape[-1] < 2:
        raise ValueError(
            "metric='accuracy' needs class scores [..., classes] and integer "
            f"labels; got predictions {tuple(pred.shape)} ({pred.dtype}) and "
            f"labels {tuple(y.shape)} ({y.dtype})"
        )
    if y.numel() and (y.min() < 0 or y.max() >= pred.shape[-1]):
        raise ValueError(
            f"labels run from {y.min().item()} to {y.max().item()} but the model "
            f"scores {pred.shape[-1]} classes"
        )
    return (pred.argmax(-1) == y).float().mean(-1)


def _metric_fn(learner, metric):
    if metric == "loss":
        return lambda pred, y: vmap(learner.loss_fn)(pred, y)  # [T]
    if metric == "accuracy":
        return _accuracy
    raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")


def evaluate(
    learner,
    tasks,
    steps=(0, 1, 10),
    num_tasks: int = 600,
    k_support: int = 10,
    k_query: int = 10,
    seed: int = 12345,
    metric: str = "loss",
    chunk: int = 100,
    device=None,
    allow_diverged: bool = False,
) -> EvalResult:
    """Adapt to fixed test tasks and report ``metric`` after each of ``steps``.

    ``tasks`` is a distribution (then ``num_tasks`` tasks are drawn from a
    generator seeded with ``seed``, ``chunk`` at a time, so every learner sees
    the same tasks) or a ``TaskBatch`` used as it is. The test tasks are fixed
    by ``seed`` *and* ``chunk`` (the draws come in chunks): keep the default
    ``chunk`` to compare with a record. ``steps`` are reported in increasing
    order, each once. Adaptation is SGD with the learner's ``inner_lr``; the
    model is not modified. A task whose metric becomes NaN or infinite raises
    ``FloatingPointError``, unless ``allow_diverged=True``: then it is counted
    in ``EvalResult.diverged``. The model runs in the mode it is in: call
    ``learner.model.eval()`` first if it has dropout (mlbook's models, whose
    batch norm keeps no running statistics, act the same in either mode).
    Introduced in ``book/01_learning_to_learn``.
    """
    if isinstance(steps, int):
        raise TypeError(f"steps must be a sequence of step counts, e.g. ({steps},)")
    steps = sorted({_positive("steps", s, int, allow_zero=True) for s in steps})
    if not steps:
        raise ValueError("steps must name at least one step count")
    score = _metric_fn(learner, metric)
    device = (
        torch.device(device)
        if device is not None
        else next(learner.model.parameters()).device
    )
    if isinstance(tasks, TaskBatch):
        if tasks.x_query.shape[1] == 0:
            raise ValueError("the tasks have no query points to evaluate on")
        batches = [tasks.to(device)]
    elif hasattr(tasks, "sample"):
        _positive("num_tasks", num_tasks, int)
        _positive("chunk", chunk, int)
        _positive("k_support", k_support, int)
        _positive("k_query", k_query, int)  # the metric is taken on the query set
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
        sizes = [min(chunk, num_tasks - i) for i in range(0, num_tasks, chunk)]
        batches = (
            tasks.sample(n, k_support, k_query, generator=generator, device=device)
            for n in sizes
        )
    else:
        raise TypeError("tasks must be a TaskBatch or have sample(...)")
    columns = []
    with torch.no_grad():  # adapt() turns autograd on for its own steps
        for batch in batches:
            fast, done, rows = None, 0, []
            for s in steps:
                if s > done:
                    fast = learner.adapt(
                        batch.x_support, batch.y_support, steps=s - done, params=fast
                    )
                    done = s
                params = fast if fast is not None else learner.params()
                rows.append(
                    score(learner.predict(params, batch.x_query), batch.y_query)
                )
            columns.append(torch.stack(rows).float().cpu())  # [steps, T]
    values = torch.cat(columns, 1)
    bad = ~torch.isfinite(values).all(1)
    if bad.any() and not allow_diverged:
        raise FloatingPointError(
            f"evaluate: the {metric} is NaN or infinite after "
            f"{[s for s, b in zip(steps, bad) if b]} steps; the adaptation diverged "
            f"(inner_lr {learner.inner_lr}) or the tasks hold NaN/inf; pass "
            "allow_diverged=True to count such tasks instead"
        )
    return EvalResult(steps, metric, values)
