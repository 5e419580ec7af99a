"""Omniglot few-shot reproductions: one command per table cell.

    python -m mlbook.omniglot_repro --method maml --way 5 --shot 1
    python -m mlbook.omniglot_repro --method reptile --way 5 --shot 5 --ship

trains ``mlbook.models.Conv4(1, way)`` on the MAML split of Omniglot
(:mod:`mlbook.fewshot`), evaluates it on 600 fixed test tasks and writes
``<out>/omniglot-<method>-<way>w<shot>s/result.json``; ``--ship`` also saves the
model into ``mlbook/checkpoints`` (``mlbook.zoo.load("omniglot-maml-5w1s")``).
Training resumes from ``<out>/.../train.pt`` when interrupted. The paper
settings are the defaults (``SETTINGS``); ``--iterations`` shortens a run, and
``--cpu-minutes`` (``--minutes``) picks the number of iterations that fits a
budget of CPU (wall-clock) time, timed on a few throw-away iterations first;
the record always names the exact ``--iterations`` that reproduces it. On
CUDA, ``--cuda-graph`` replays each meta-step from a CUDA graph.

Settings (``settings()``):

* MAML (Finn et al., 2017, section 5.2 and their code): one SGD inner step with
  inner_lr 0.4 and meta-batch 32 tasks for 5-way; five steps with inner_lr 0.1
  and meta-batch 16 for 20-way; Adam outer_lr 1e-3; 60,000 iterations; the
  query set has as many images per class as the support set (``k_query =
  k_shot``, their ``update_batch_size * 2``); at test time 10 SGD steps with
  the same inner_lr (their code's ``test_num_updates``; the paper's text says
  3 steps for 5-way, also reported).
* First-order MAML: the same, without the second-order term.
* Reptile (Nichol et al., 2018, table 3 and their ``run_omniglot.sh``):
  meta-batch 5, outer step size 1.0 annealed linearly to 0, 100,000 iterations
  (200,000 for 20-way), 10 training shots per class, 5 inner steps (10 for
  20-way), 50 inner steps at test time. One departure: the paper's inner loop
  is Adam (lr 1e-3, beta1 0) on minibatches of 10 (20 for 20-way) examples,
  while ``mlbook.Reptile`` takes full-batch SGD steps; we use inner_lr 0.1
  (our choice, not tuned against the test set).

Evaluation: 600 test tasks from a generator seeded 12345, accuracy after each
number of steps with a 95% interval (1.96 standard errors over tasks);
transductive (the whole query set in one batch: batch-norm statistics shared,
the Conv4 default) and one query image at a time
(:func:`mlbook.fewshot.evaluate_one_query_at_a_time`, the Reptile paper's
non-transductive protocol). Introduced in ``book/07_few_shot_images``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import fewshot, zoo
from .data import omniglot as omniglot_data
from .maml import MAML
from .models import Conv4
from .reproduce import _commit, _machine
from .reptile import Reptile
from .train import default_device, evaluate, meta_train

METHODS = ("maml", "fomaml", "reptile")
EVAL = dict(num_tasks=600, seed=12345)
# The quick check tests/test_omniglot.py repeats on every shipped model: the
# transductive accuracy on these few tasks after the headline number of steps.
CHECK = dict(num_tasks=20, seed=2024)
PAPER = {  # test accuracy (%) and 95% interval where given; see DESIGN.md section 6
    ("maml", 5, 1): (98.7, 0.4), ("maml", 5, 5): (99.9, 0.1),
    ("maml", 20, 1): (95.8, 0.3), ("maml", 20, 5): (98.9, 0.2),
    ("fomaml", 5, 1): (98.3, 0.5), ("fomaml", 5, 5): (99.2, 0.2),
    ("fomaml", 20, 1): (89.4, 0.5), ("fomaml", 20, 5): (97.9, 0.1),
    ("reptile", 5, 1): (95.39, 0.09), ("reptile", 5, 5): (98.90, 0.10),
    ("reptile", 20, 1): (88.14, 0.15), ("reptile", 20, 5): (96.65, 0.33),
    ("reptile+transduction", 5, 1): (97.68, 0.04),
    ("reptile+transduction", 5, 5): (99.48, 0.06),
    ("reptile+transduction", 20, 1): (89.43, 0.14),
    ("reptile+transduction", 20, 5): (97.12, 0.32),
}


def name(method: str, way: int, shot: int) -> str:
    """Checkpoint name, e.g. ``omniglot-maml-5w1s``."""
    return f"omniglot-{method}-{way}w{shot}s"


def settings(method: str, way: int, shot: int) -> dict:
    """The paper settings of one table cell (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("maml", "fomaml"):
        five = way <= 5
        return dict(
            method=method, way=way, shot=shot, first_order=method == "fomaml",
            inner_lr=0.4 if five else 0.1, inner_steps=1 if five else 5,
            meta_batch=32 if five else 16, outer_lr=1e-3, iterations=60_000,
            k_support=shot, k_query=shot, test_steps=[0, 1, 3, 10], headline_steps=10,
        )
    return dict(
        method=method, way=way, shot=shot, inner_lr=0.1,
        inner_steps=5 if way <= 5 else 10, meta_batch=5, outer_lr=1.0,
        outer_lr_final=0.0, iterations=100_000 if way <= 5 else 200_000,
        k_support=10, k_query=0, test_steps=[0, 1, 10, 50], headline_steps=50,
    )


class AnnealedReptile:
    """Reptile whose outer_lr falls linearly from ``start`` to ``final`` over
    ``total`` iterations (the Reptile paper's schedule); ``iteration`` counts
    the steps taken (set it when resuming)."""

    uses_optimizer = False

    def __init__(self, reptile: Reptile, start: float, final: float, total: int):
        self.reptile, self.model = reptile, reptile.model
        self.start, self.final, self.total, self.iteration = start, final, total, 0
        self._lr = None

    def prepare_step(self):
        """Host side of an iteration: set this iteration's outer_lr. It lives in
        a device tensor that ``step`` reads, so a CUDA-graph replay sees it."""
        frac = self.iteration / max(self.total, 1)
        lr = self.start + (self.final - self.start) * frac
        self.reptile.outer_lr = lr
        device = next(self.model.parameters()).device
        if self._lr is None or self._lr.device != device:
            self._lr = torch.tensor(lr, device=device)
        else:
            self._lr.fill_(lr)
        self.iteration += 1

    def step(self, batch, optimizer=None):
        return self.reptile.step(batch, outer_lr=self._lr)

    def meta_step(self, batch, optimizer=None):
        self.prepare_step()
        return self.step(batch).item()

    @property
    def check_finite(self):
        return self.reptile.check_finite

    @check_finite.setter
    def check_finite(self, value):
        self.reptile.check_finite = value


def make_learner(s: dict, model=None, conv_impl: str = "grouped"):
    """A fresh Conv4 (or ``model``) and the learner for settings ``s``."""
    model = model if model is not None else Conv4(1, s["way"])
    if s["method"] == "reptile":
        return Reptile(model, F.cross_entropy, inner_lr=s["inner_lr"],
                       inner_steps=s["inner_steps"], outer_lr=s["outer_lr"],
                       conv_impl=conv_impl)
    return MAML(model, F.cross_entropy, inner_lr=s["inner_lr"],
                inner_steps=s["inner_steps"], first_order=s["first_order"],
                conv_impl=conv_impl)


def _trainer(s, learner, iterations):
    if s["method"] == "reptile":
        return AnnealedReptile(learner, s["outer_lr"], s["outer_lr_final"], iterations)
    return learner


def _seconds_per_iteration(s, train, device, cuda_graph=False, conv_impl="grouped",
                           clock=time.perf_counter, short=5, long=25) -> float:
    """Seconds of one meta-iteration on ``clock`` (wall or CPU time): two
    throw-away runs of ``short`` and ``long`` iterations, so start-up (a graph
    capture, say) cancels out of the difference."""
    def timed(n, seed):
        learner = make_learner(s, conv_impl=conv_impl)
        trainer = _trainer(s, learner, n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        meta_train(trainer, train, n, num_tasks=s["meta_batch"],
                   k_support=s["k_support"], k_query=s["k_query"],
                   outer_lr=s["outer_lr"], seed=seed, device=device, progress=False,
                   cuda_graph=cuda_graph)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    timed(short, 1)  # warm-up: library handles, kernel selection
    return max((timed(long, 2) - timed(short, 3)) / (long - short), 1e-6)


def evaluate_cell(learner, test, s, num_tasks=EVAL["num_tasks"], seed=EVAL["seed"],
                  one_query_tasks=None) -> dict:
    """Accuracy on ``num_tasks`` test tasks: transductive after each of the
    test steps, and one query image at a time after the headline steps (on the
    first ``one_query_tasks`` of those tasks; default all)."""
    evs = fewshot.evaluate_protocols(
        learner, test, steps=tuple(s["test_steps"]), num_tasks=num_tasks,
        k_support=s["shot"], k_query=s["shot"], seed=seed,
        one_query_steps=(s["headline_steps"],), one_query_tasks=one_query_tasks)
    return {k: v.as_dict() for k, v in evs.items()}


def quick_check(learner, test, s, **overrides) -> dict:
    """Transductive accuracy on the ``CHECK`` tasks after the headline steps."""
    c = {**CHECK, **overrides}
    ev = evaluate(learner, test, steps=(s["headline_steps"],), num_tasks=c["num_tasks"],
                  k_support=s["shot"], k_query=s["shot"], seed=c["seed"],
                  metric="accuracy")
    return dict(c, steps=s["headline_steps"], accuracy=ev.mean[0])


def headline(result: dict, protocol: str = "transductive") -> tuple[float, float]:
    """(accuracy %, 95% interval %) after the headline number of test steps."""
    ev = result["eval"][protocol]
    i = ev["steps"].index(result["settings"]["headline_steps"])
    return 100 * ev["mean"][i], 100 * ev["ci95"][i]


def run(method="maml", way=5, shot=1, iterations=None, cpu_minutes=None, seed=0,
        out="runs/omniglot", device=None, ship=False, eval_tasks=EVAL["num_tasks"],
        one_query_tasks=None, meta_batch=None, root=None, progress=True,
        minutes=None, cuda_graph=False, conv_impl="grouped") -> dict:
    """Train and evaluate one table cell; returns (and writes) its result.
    ``meta_batch`` overrides the paper's number of tasks per meta-iteration
    (the record keeps both). ``minutes`` (wall clock) or ``cpu_minutes`` pick
    the number of iterations that fits; ``cuda_graph`` replays each step from
    a CUDA graph (``mlbook.graph``)."""
    s = settings(method, way, shot)
    paper_meta_batch = s["meta_batch"]
    if meta_batch is not None:
        s["meta_batch"] = meta_batch
    device = torch.device(device) if device is not None else default_device()
    data = omniglot_data.load(root)
    train = fewshot.omniglot("train", way, data=data)
    test = fewshot.omniglot("test", way, data=data)
    per_it = wall_per_it = None
    if iterations is None and minutes is not None:
        wall_per_it = _seconds_per_iteration(s, train, device, cuda_graph, conv_impl)
        iterations = max(1, int(minutes * 60 / wall_per_it))
        if progress:
            print(f"{1e3 * wall_per_it:.1f} ms / iteration -> {iterations} iterations "
                  f"in {minutes} minutes", file=sys.stderr)
    if iterations is None and cpu_minutes is not None:
        # CPU runs are slow: fewer throw-away iterations (1, then 1 and 4)
        per_it = _seconds_per_iteration(s, train, device, cuda_graph, conv_impl,
                                        clock=time.process_time, short=1, long=4)
        iterations = max(1, int(cpu_minutes * 60 / per_it))
        if progress:
            print(f"{per_it:.2f} CPU s / iteration -> {iterations} iterations in "
                  f"{cpu_minutes} CPU minutes", file=sys.stderr)
    iterations = s["iterations"] if iterations is None else iterations
    cell = name(method, way, shot)
    folder = Path(out) / cell
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "train.pt"

    torch.manual_seed(seed)
    learner = make_learner(s, conv_impl=conv_impl)
    trainer = _trainer(s, learner, iterations)
    if ckpt.exists() and isinstance(trainer, AnnealedReptile):
        trainer.iteration = torch.load(ckpt, weights_only=True)["iteration"]
    wall, cpu = time.perf_counter(), time.process_time()
    res = meta_train(trainer, train, iterations, num_tasks=s["meta_batch"],
                     k_support=s["k_support"], k_query=s["k_query"],
                     outer_lr=s["outer_lr"], seed=seed, device=device, checkpoint=ckpt,
                     checkpoint_every=100, progress=progress, cuda_graph=cuda_graph)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    learner.model.eval()  # Conv4's batch norm uses batch statistics either way
    wall, cpu = time.perf_counter(), time.process_time()
    ev = evaluate_cell(learner, test, s, num_tasks=eval_tasks,
                       one_query_tasks=one_query_tasks)
    eval_wall, eval_cpu = time.perf_counter() - wall, time.process_time() - cpu
    check = quick_check(learner, test, s)
    command = (f"python -m mlbook.omniglot_repro --method {method} --way {way} "
               f"--shot {shot} --iterations {iterations}"
               + (f" --meta-batch {meta_batch}" if meta_batch is not None else "")
               + (f" --seed {seed}" if seed else "")
               + (f" --eval-tasks {eval_tasks}" if eval_tasks != EVAL["num_tasks"]
                  else "")
               + (f" --one-query-tasks {one_query_tasks}" if one_query_tasks else "")
               + (" --cuda-graph" if cuda_graph else "")
               + (f" --conv-impl {conv_impl}" if conv_impl != "grouped" else "")
               + (" --ship" if ship else ""))
    losses = res.losses
    result = dict(
        name=cell,
        model=dict(kind="Conv4", in_channels=1, num_classes=way, hidden=64,
                   image_size=28),
        settings=s,
        paper_iterations=s["iterations"], paper_meta_batch=paper_meta_batch,
        train=dict(iterations=iterations, seed=seed, meta_batch=s["meta_batch"],
                   wall_seconds=round(train_wall, 1), cpu_seconds=round(train_cpu, 1),
                   cpu_seconds_per_iteration=round(per_it, 3) if per_it else None,
                   wall_ms_per_iteration=round(1e3 * train_wall / max(
                       iterations - res.resumed_from, 1), 2),
                   cuda_graph=cuda_graph, conv_impl=conv_impl,
                   resumed_from=res.resumed_from,
                   final_loss=sum(losses[-50:]) / max(len(losses[-50:]), 1)),
        eval=ev,
        eval_tasks=eval_tasks,
        eval_wall_seconds=round(eval_wall, 1), eval_cpu_seconds=round(eval_cpu, 1),
        check=check,
        paper=PAPER.get((method, way, shot)),
        command=command,
        device=str(device), threads=torch.get_num_threads(),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else _machine()),
        torch=torch.__version__, python=platform.python_version(), commit=_commit(),
        data_split="MAML split, numpy RandomState(1); rotations as classes",
    )
    result["accuracy"], result["ci95"] = headline(result)
    result["accuracy_one_query_at_a_time"], result["ci95_one_query_at_a_time"] = \
        headline(result, "one_query_at_a_time")
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if ship:
        zoo.save(cell, learner.model, result, overwrite=True)
    return result


def paper_numbers(method: str, way: int, shot: int) -> dict:
    """The papers' accuracy (%, 95% interval) for one cell, by protocol:
    ``{"transductive": ..., "one_query_at_a_time": ...}`` (None where the
    papers give none). MAML's numbers are transductive; the Reptile paper
    gives both."""
    if method == "reptile":
        return {"transductive": PAPER.get(("reptile+transduction", way, shot)),
                "one_query_at_a_time": PAPER.get(("reptile", way, shot))}
    return {"transductive": PAPER.get((method, way, shot)), "one_query_at_a_time": None}


def table(results, protocols=("transductive", "one_query_at_a_time")) -> str:
    """A plain-text table of results next to the papers' numbers, by protocol
    (both by default; name one for a table half as wide)."""
    def cell(pair):
        return f"{pair[0]:6.2f} +- {pair[1]:<5.2f}" if pair else f"{'-':>6}{'':9}"

    titles = {"transductive": "transductive",
              "one_query_at_a_time": "one query at a time"}
    lines = [f"{'':22} {'':>10}" + "".join(f" {titles[p]:^31}" for p in protocols),
             f"{'cell':<22} {'iterations':>10}"
             + f" {'ours':^15} {'paper':^15}" * len(protocols)]
    for r in results:
        s = r["settings"]
        paper = paper_numbers(s["method"], s["way"], s["shot"])
        iters = f"{r['train']['iterations']}/{r['paper_iterations'] // 1000}k"
        lines.append(f"{r['name']:<22} {iters:>10}" + "".join(
            f" {cell(headline(r, p))} {cell(paper[p])}" for p in protocols))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlbook.omniglot_repro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="maml")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--iterations", type=int, default=None,
                   help="meta-iterations (default: the paper's)")
    p.add_argument("--cpu-minutes", type=float, default=None,
                   help="choose --iterations to fit this much CPU time")
    p.add_argument("--minutes", type=float, default=None,
                   help="choose --iterations to fit this much wall-clock time")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each meta-step from a CUDA graph (CUDA only)")
    p.add_argument("--conv-impl", choices=("grouped", "bmm"), default="grouped",
                   help="how the tasks' convolutions are batched")
    p.add_argument("--meta-batch", type=int, default=None,
                   help="tasks per meta-iteration (default: the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tasks", type=int, default=EVAL["num_tasks"],
                   help="test tasks (default 600)")
    p.add_argument("--one-query-tasks", type=int, default=None,
                   help="score only the first N test tasks one query image at a "
                   "time (default: all; it costs one forward pass per image)")
    p.add_argument("--out", default="runs/omniglot")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=None,
                   help="data folder (default $MLBOOK_DATA, else ~/.cache/mlbook)")
    p.add_argument("--ship", action="store_true",
                   help="also save the model into mlbook/checkpoints")
    a = p.parse_args(argv)
    # Refused here, before the images are decoded and the timing iterations run.
    device = torch.device(a.device) if a.device else default_device()
    if a.cuda_graph and device.type != "cuda":
        p.error(f"--cuda-graph needs a CUDA device; this run would use {device} "
                "(drop --cuda-graph there)")
    torch.set_num_threads(a.threads)
    r = run(a.method, a.way, a.shot, a.iterations, a.cpu_minutes, a.seed, a.out,
            a.device, a.ship, a.eval_tasks, a.one_query_tasks, a.meta_batch, a.root,
            minutes=a.minutes, cuda_graph=a.cuda_graph, conv_impl=a.conv_impl)
    print(table([r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
