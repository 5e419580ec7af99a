"""Speed benchmark: ``python -m mlbook bench``.

Times one MAML meta-step (second order, one inner SGD step, Adam outer step)
for mlbook against baselines written here, in the same process, on the same
data: a plain per-task autograd loop, a plain ``torch.func`` vmap step, and
``higher`` when it is installed. Two workloads: the sinusoid (MLP 1-40-40-1,
meta-batch 25, K = 10) and Omniglot-shaped 5-way 1-shot episodes for Conv4
(random images of the right shape: speed does not depend on the pixels).
Variants run in interleaved rounds and the median round is reported, so a
busy machine slows all of them alike. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .maml import MAML
from .models import MLP, Conv4
from .tasks import Sinusoid, TaskBatch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- baselines, written independently of mlbook -----------------------------
def loop_step(model, loss_fn, batch, alpha, opt):
    """One task at a time: autograd.grad with create_graph, then the query loss."""
    params = dict(model.named_parameters())
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for t in range(batch.num_tasks):
        out = functional_call(model, params, (batch.x_support[t],))
        loss = loss_fn(out, batch.y_support[t])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {k: p - alpha * g for (k, p), g in zip(params.items(), grads)}
        out = functional_call(model, fast, (batch.x_query[t],))
        total = total + loss_fn(out, batch.y_query[t])
    (total / batch.num_tasks).backward()
    opt.step()


def vmap_step(model, loss_fn, batch, alpha, opt):
    """The textbook torch.func version: grad inside vmap over tasks."""
    params = dict(model.named_parameters())

    def loss(p, x, y):
        return loss_fn(functional_call(model, p, (x,)), y)

    def task(p, xs, ys, xq, yq):
        g = grad(loss)(p, xs, ys)
        return loss({k: p[k] - alpha * g[k] for k in p}, xq, yq)

    opt.zero_grad(set_to_none=True)
    losses = vmap(task, in_dims=(None, 0, 0, 0, 0))(
        params, batch.x_support, batch.y_support, batch.x_query, batch.y_query
    )
    losses.mean().backward()
    opt.step()


def higher_step(model, loss_fn, batch, alpha, opt):  # pragma: no cover - optional
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=alpha)
    opt.zero_grad(set_to_none=True)
    for t in range(batch.num_tasks):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (f, d):
            d.step(loss_fn(f(batch.x_support[t]), batch.y_support[t]))
            (
                loss_fn(f(batch.x_query[t]), batch.y_query[t]) / batch.num_tasks
            ).backward()
    opt.step()


# -- workloads ------------------------------------------------------------------
def sinusoid_workload(device, num_tasks=25):
    batch = Sinusoid().sample(
        num_tasks, 10, 10, generator=torch.Generator().manual_seed(0)
    )
    return "sinusoid", lambda: MLP(1, (40, 40), 1), F.mse_loss, 0.01, batch.to(device)


def conv4_workload(device, num_tasks=32, n_way=5, k_shot=1, k_query=5):
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(num_tasks, n_way * k_shot, 1, 28, 28, generator=g)
    xq = torch.rand(num_tasks, n_way * k_query, 1, 28, 28, generator=g)
    ys = torch.arange(n_way).repeat_interleave(k_shot).expand(num_tasks, -1)
    yq = torch.arange(n_way).repeat_interleave(k_query).expand(num_tasks, -1)
    batch = TaskBatch(xs, ys.contiguous(), xq, yq.contiguous()).to(device)
    name = f"conv4-{n_way}w{k_shot}s"
    return name, lambda: Conv4(1, n_way), F.cross_entropy, 0.4, batch


def variants(loss_fn, alpha):
    def mlbook_step(model, loss_fn, batch, alpha, opt):
        MAML(model, loss_fn, inner_lr=alpha, inner_steps=1).meta_step(batch, opt)

    out = {
        "mlbook": mlbook_step,
        "torch.func vmap": vmap_step,
        "per-task loop": loop_step,
    }
    try:
        import higher  # noqa: F401

        out["higher"] = higher_step
    except ImportError:
        pass
    return out


def run_workload(workload, device, rounds, steps_per_round, skip=()):
    name, make_model, loss_fn, alpha, batch = workload
    setups = {}
    for label, fn in variants(loss_fn, alpha).items():
        if label in skip:
            continue
        torch.manual_seed(0)
        model = make_model().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        setups[label] = (fn, model, opt)
    times = {label: [] for label in setups}
    memory = {}
    for label, (fn, model, opt) in setups.items():  # warm-up and peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            fn(model, loss_fn, batch, alpha, opt)
        _sync(device)
        if device.type == "cuda":
            memory[label] = torch.cuda.max_memory_allocated(device) / 2**20
    for _ in range(rounds):
        for label, (fn, model, opt) in setups.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                fn(model, loss_fn, batch, alpha, opt)
            _sync(device)
            times[label].append((time.perf_counter() - start) / steps_per_round)
    rows = []
    base = (
        statistics.median(times["per-task loop"]) if "per-task loop" in times else None
    )
    for label, ts in times.items():
        sec = statistics.median(ts)
        rows.append(
            dict(
                workload=name,
                variant=label,
                ms_per_step=1e3 * sec,
                steps_per_s=1 / sec,
                tasks_per_s=batch.num_tasks / sec,
                speedup_vs_loop=(base / sec) if base else None,
                peak_mib=memory.get(label),
                rounds=rounds,
                steps_per_round=steps_per_round,
                num_tasks=batch.num_tasks,
            )
        )
    return rows


def format_rows(rows) -> str:
    head = (
        f"{'workload':<14} {'variant':<16} {'ms/step':>9} {'steps/s':>9} "
        f"{'tasks/s':>9} {'x loop':>7} {'peak MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r['speedup_vs_loop']:.1f}" if r["speedup_vs_loop"] else "-"
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        lines.append(
            f"{r['workload']:<14} {r['variant']:<16} {r['ms_per_step']:>9.2f} "
            f"{r['steps_per_s']:>9.1f} {r['tasks_per_s']:>9.0f} {speed:>7} "
            f"{mem:>9}"
        )
    return "\n".join(lines)


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
    p.add_argument("--workloads", default="sinusoid,conv4")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--conv-tasks",
        type=int,
        default=None,
        help="Conv4 meta-batch (default 32 on GPU, 8 on CPU)",
    )
    p.add_argument("--out", default="bench.json", help="where to write the JSON")
    args = p.parse_args(argv)
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    rows = []
    for w in args.workloads.split(","):
        if w == "sinusoid":
            rows += run_workload(
                sinusoid_workload(device), device, args.rounds, 50 if cuda else 20
            )
        elif w == "conv4":
            tasks = args.conv_tasks or (32 if cuda else 8)
            rows += run_workload(
                conv4_workload(device, tasks), device, args.rounds, 10 if cuda else 1
            )
        else:
            p.error(f"unknown workload {w!r}")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(
        f"device: {device} ({name}); torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}"
    )
    print(format_rows(rows))
    record = dict(
        device=str(device),
        device_name=name,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        rows=rows,
    )
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
