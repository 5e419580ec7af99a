"""Paper reproductions, one function per experiment, run by ``python -m mlbook``.

``sinusoid``: the MAML paper's regression benchmark (Finn et al., 2017) at its
settings (MLP 1-40-40-1, K = 10, one SGD step with alpha = 0.01, meta-batch 25,
Adam 1e-3, 70,000 iterations) for MAML, first-order MAML, Reptile and the
pretrained baseline; MSE after 0, 1 and 10 steps on 600 fixed test tasks.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import zoo
from .inner import _positive
from .maml import MAML
from .models import MLP
from .reptile import Reptile
from .tasks import Sinusoid
from .train import evaluate, meta_train
from .transfer import Pretrained

# Settings of each method. MAML/FOMAML/pretrained follow the MAML paper;
# Reptile takes several inner steps (with one step it is joint training) and a
# plain outer step, as in the Reptile paper's sinusoid demo.
SINUSOID = {
    "maml": dict(cls=MAML, inner_lr=0.01, inner_steps=1),
    "fomaml": dict(cls=MAML, inner_lr=0.01, inner_steps=1, first_order=True),
    "reptile": dict(cls=Reptile, inner_lr=0.02, inner_steps=5, outer_lr=0.1),
    "pretrained": dict(cls=Pretrained, inner_lr=0.01, inner_steps=1),
}
# The paper's meta-training batch: 25 tasks of K = 10 (+ 10 query), Adam 1e-3.
TRAIN = dict(num_tasks=25, k_support=10, k_query=10, outer_lr=1e-3)
EVAL = dict(steps=(0, 1, 10), num_tasks=600, k_support=10, k_query=100, seed=12345)
TEST_LR = 0.01  # every method is fine-tuned at test time with SGD, alpha = 0.01


def _git(*args) -> str:
    return subprocess.run(
        ["git", *args], text=True, capture_output=True,
        cwd=Path(__file__).parent, timeout=5,
    ).stdout.strip()


def _commit() -> str:
    """The commit a record was made with; ``-dirty`` when the package's files
    differ from it (then the record is not reproducible from the commit)."""
    if os.environ.get("MLBOOK_COMMIT"):  # a copy of the tree without .git
        return os.environ["MLBOOK_COMMIT"]
    try:
        head = _git("rev-parse", "--short", "HEAD")
        if not head:
            return "unknown"
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    """The processor's name (``/proc/cpuinfo`` on Linux), for records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def sinusoid_learner(method: str, model=None, compile: bool = False):
    """The learner for ``method`` with its settings, on a fresh (or given) MLP.
    ``compile`` is passed to MAML, first-order MAML and Reptile (see
    ``mlbook.MAML`` and ``mlbook.Reptile``; the baseline has no compiled step)."""
    settings = dict(SINUSOID[method])
    cls = settings.pop("cls")
    model = model if model is not None else MLP(1, (40, 40), 1)
    if compile and cls in (MAML, Reptile):
        settings["compile"] = True
    return cls(model, F.mse_loss, **settings)


def sinusoid(
    methods=tuple(SINUSOID),
    iterations=70_000,
    out="runs/sinusoid",
    seed=0,
    device=None,
    ship=False,
    progress=True,
    eval_tasks=600,
    compile=False,
) -> dict:
    """Train and evaluate each method; returns and writes ``results.json``."""
    if ship and eval_tasks != EVAL["num_tasks"]:
        raise ValueError("ship=True needs the full evaluation (eval_tasks=600)")
    unknown = sorted(set(methods) - set(SINUSOID))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(SINUSOID)}")
    # checked before the first method trains, not when the evaluation needs it
    _positive("iterations", iterations, int)
    _positive("eval_tasks", eval_tasks, int)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    # Other methods' results from an earlier run into the same folder stay.
    earlier = json.loads(path.read_text()) if path.exists() else {}
    dist = Sinusoid()
    results = {}
    for method in methods:
        torch.manual_seed(seed)
        learner = sinusoid_learner(method, compile=compile)
        run = meta_train(
            learner,
            dist,
            iterations,
            **TRAIN,
            seed=seed,
            device=device,
            checkpoint=out / f"{method}.pt",
            progress=progress,
        )
        # Test-time fine-tuning is the same SGD for everyone.
        learner.inner_lr = TEST_LR
        start = time.perf_counter()
        # A 1-step meta-learned init can be sharp enough that 10 steps at the
        # same alpha diverge on a few tasks: count them instead of failing.
        ev = evaluate(
            learner, dist, **(EVAL | {"num_tasks": eval_tasks}), allow_diverged=True
        )
        by_k = {
            k: evaluate(
                learner,
                dist,
                steps=tuple(range(11)),
                num_tasks=eval_tasks,
                k_support=k,
                k_query=100,
                seed=EVAL["seed"],
                allow_diverged=True,
            ).as_dict()
            for k in (5, 10, 20)
        }
        results[method] = dict(
            method=method,
            iterations=iterations,
            train_seconds=round(run.seconds, 1),
            compile=bool(compile and type(learner) in (MAML, Reptile)),
            eval_seconds=round(time.perf_counter() - start, 1),
            eval=ev.as_dict(),
            eval_by_k=by_k,
            final_train_loss=sum(run.losses[-1000:]) / len(run.losses[-1000:]),
        )
        if ship:
            record = dict(
                name=f"sinusoid-{method}",
                model=dict(kind="MLP", in_features=1, hidden=[40, 40], out_features=1),
                settings={k: v for k, v in SINUSOID[method].items() if k != "cls"},
                train=dict(TRAIN, iterations=iterations, seed=seed),
                test_lr=TEST_LR,
                eval_protocol=dict(EVAL, steps=list(EVAL["steps"]), test_lr=TEST_LR),
                results=results[method],
                command=f"python -m mlbook sinusoid --iterations {iterations}"
                + (" --compile" if compile else "")
                + " --ship",
                device=str(next(learner.model.parameters()).device),
                torch=torch.__version__,
                python=platform.python_version(),
                commit=_commit(),
            )
            zoo.save(f"sinusoid-{method}", learner.model, record, overwrite=True)
        # after each method: a later one that fails does not lose this one
        path.write_text(json.dumps(earlier | results, indent=2) + "\n")
    return results


def sinusoid_table(results: dict) -> str:
    """A plain-text table: MSE after 0, 1, 10 steps (mean +- 95% interval);
    ``[n!]`` marks n test tasks whose adaptation diverged (left out of the mean)."""
    lines = [
        f"{'method':<11} {'0 steps':>21} {'1 step':>21} {'10 steps':>21} {'train s':>8}"
    ]
    for method, r in results.items():
        ev = r["eval"]
        diverged = ev.get("diverged", [0] * len(ev["mean"]))
        cells = [
            f"{m:8.4f} +- {c:.4f}" + (f" [{d}!]" if d else "    ")
            for m, c, d in zip(ev["mean"], ev["ci95"], diverged)
        ]
        lines.append(
            f"{method:<11} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17} "
            f"{r['train_seconds']:>8.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m mlbook sinusoid")
