"""MAML and first-order MAML against independent computations, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlbook as ml
from mlbook.grouped_conv import shared_conv2d


def linear_tasks(num_tasks, k, q, d, device, gen):
    xs = torch.randn(num_tasks, k, d, generator=gen, dtype=torch.float64)
    ys = torch.randn(num_tasks, k, 1, generator=gen, dtype=torch.float64)
    xq = torch.randn(num_tasks, q, d, generator=gen, dtype=torch.float64)
    yq = torch.randn(num_tasks, q, 1, generator=gen, dtype=torch.float64)
    return ml.TaskBatch(xs, ys, xq, yq).to(device)


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_closed_form_linear_regression(device, steps):
    # f(x) = x . w, L(w) = (1/K) ||X w - y||^2, so grad = (2/K) X^T (X w - y) and
    # H = (2/K) X^T X. After n SGD steps d w_n / d w = (I - alpha H)^n, hence the
    # meta-gradient of task T is (I - alpha H_s)^n (2/Q) X_q^T (X_q w_n - y_q).
    d, alpha = 4, 0.05
    gen = torch.Generator().manual_seed(1)
    net = nn.Linear(d, 1, bias=False).double().to(device)
    batch = linear_tasks(5, 6, 7, d, device, gen)
    maml = ml.MAML(net, F.mse_loss, inner_lr=alpha, inner_steps=steps)
    maml.meta_loss(batch).backward()

    w0 = net.weight.detach().reshape(d, 1)
    expected = torch.zeros_like(w0)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    for t in range(batch.num_tasks):
        xs, ys = batch.x_support[t], batch.y_support[t]
        xq, yq = batch.x_query[t], batch.y_query[t]
        hess = 2 / xs.shape[0] * xs.T @ xs
        w = w0.clone()
        for _ in range(steps):
            w = w - alpha * 2 / xs.shape[0] * xs.T @ (xs @ w - ys)
        outer = 2 / xq.shape[0] * xq.T @ (xq @ w - yq)
        expected += torch.linalg.matrix_power(eye - alpha * hess, steps) @ outer
    expected /= batch.num_tasks
    torch.testing.assert_close(
        net.weight.grad.reshape(d, 1), expected, rtol=1e-10, atol=1e-12
    )


def test_meta_gradient_matches_finite_differences_mlp(device):
    gen = torch.Generator().manual_seed(2)
    net = ml.models.MLP(1, (6, 5), 1).double().to(device)
    batch = ml.tasks.Sinusoid().sample(3, 5, 4, generator=gen).to(device)
    batch = ml.TaskBatch(
        *(
            t.double()
            for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
        )
    )
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.1, inner_steps=2)
    maml.meta_loss(batch).backward()
    eps = 1e-6
    for p in net.parameters():
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = maml.meta_loss(batch).item()
            flat[i] = old - eps
            down = maml.meta_loss(batch).item()
            flat[i] = old
            assert abs((up - down) / (2 * eps) - grad[i].item()) < 1e-6 * max(
                1.0, abs(grad[i].item())
            )


def conv4_forward(params, x, num_blocks=4):
    """Conv4 written with plain torch.nn.functional (no torch.func, no module)."""
    h = x
    for b in range(num_blocks):
        h = F.conv2d(
            h,
            params[f"features.{4 * b}.weight"],
            params[f"features.{4 * b}.bias"],
            padding=1,
        )
        h = F.batch_norm(
            h,
            None,
            None,
            params[f"features.{4 * b + 1}.weight"],
            params[f"features.{4 * b + 1}.bias"],
            training=True,
        )
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), params["head.weight"], params["head.bias"])


@pytest.mark.parametrize(
    "impl",
    [
        "grouped", "grouped-batched", "grouped-levers", "grouped-twice",
        "grouped-compiled", "grouped-compiled-nhwc", "grouped-compiled-shared",
        "grouped-shared", "bmm", "by-task", "vmap",
    ],
)
def test_conv4_batchnorm_meta_gradient_matches_per_task_autograd(
    device, impl, request, monkeypatch
):
    # Conv4's batched forward puts the tasks' channels side by side (grouped
    # convolution, with either second derivative, or unfold + bmm, and one
    # batch norm), or takes the tasks one at a time (the CPU's default);
    # any other model runs under vmap. Each is checked, double backward
    # included, against a per-task loop of ordinary autograd.
    compiled = impl.startswith("grouped-compiled")
    if compiled:
        request.getfixturevalue("needs_compile")
    gen = torch.Generator().manual_seed(3)
    n_way, k, q, tasks, alpha, steps = 5, 1, 2, 3, 0.4, 2
    net = ml.models.Conv4(1, n_way, hidden=8).double().to(device)
    x_s = torch.randn(tasks, n_way * k, 1, 28, 28, generator=gen, dtype=torch.float64)
    x_q = torch.randn(tasks, n_way * q, 1, 28, 28, generator=gen, dtype=torch.float64)
    y_s = torch.arange(n_way).repeat_interleave(k).expand(tasks, -1)
    y_q = torch.arange(n_way).repeat_interleave(q).expand(tasks, -1)
    batch = ml.TaskBatch(x_s, y_s, x_q, y_q).to(device)
    maml = ml.MAML(net, F.cross_entropy, inner_lr=alpha, inner_steps=steps)
    assert maml._conv_plan is not None
    if impl == "vmap":
        maml._conv_plan = None  # what every other model runs
    elif impl == "by-task":
        maml._task_by_task = True
    else:
        conv_impl = impl.split("-")[0]
        maml = ml.MAML(
            net, F.cross_entropy, inner_lr=alpha, inner_steps=steps, conv_impl=conv_impl
        )
        # mlbook.grouped_conv for the support pass, and autograd's double
        # backward of F.conv2d (each device's default is one of the two)
        maml._batched_double = impl != "grouped"
        # mlbook.fused_block (compiled) in every pass, or only in the passes
        # differentiated twice (CUDA's default), and the first layer as a
        # batched matmul (CUDA's default too)
        levers = compiled or impl in ("grouped-levers", "grouped-twice")
        twice = compiled or impl == "grouped-twice"
        maml._fused_block = "twice" if twice else levers
        maml._one_channel_matmul = levers
        # and the query pass through torch.compile, with the block's
        # statistics in one read: with the two above, CUDA's default step
        maml._compiled_passes = compiled
        maml._one_pass_stats = compiled
        if impl == "grouped-compiled-nhwc":
            # that step with channels-last activations in every pass (an
            # experiment: `bench --experiments`' "NHWC + graph")
            maml._channels_last = True
        if impl.endswith("-shared"):
            # the first inner step's convolutions as dense ones over all
            # tasks' examples (every task starts from theta), an experiment:
            # `bench --experiments`' "shared first step + graph"
            maml._shared_first_step = True
        maml._task_by_task = False  # all tasks at once, as on CUDA
    calls = []
    spy = lambda *args: calls.append(1) or shared_conv2d(*args)  # noqa: E731
    monkeypatch.setattr(ml.inner, "shared_conv2d", spy)
    maml.meta_loss(batch).backward()
    # taken at the first of the two inner steps only, only when asked for,
    # by the three convolutions after the first (whose input, a view of x
    # across tasks, is not N*T images in one block of memory)
    assert len(calls) == (3 if impl.endswith("-shared") else 0)
    got = {n: p.grad.clone() for n, p in net.named_parameters()}

    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    total = 0
    for t in range(tasks):
        fast = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(
                conv4_forward(fast, batch.x_support[t]), batch.y_support[t]
            )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - alpha * g for (n, w), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(
            conv4_forward(fast, batch.x_query[t]), batch.y_query[t]
        )
    expected = torch.autograd.grad(total / tasks, list(theta.values()))
    for (name, _), e in zip(theta.items(), expected):
        torch.testing.assert_close(got[name], e, rtol=1e-8, atol=1e-10, msg=name)


def first_order_reference(net, loss_fn, batch, alpha, steps):
    """First-order MAML's meta-gradient by plain autograd: per task, SGD on a
    copy of the module, then the query gradient at the adapted weights;
    averaged over tasks."""
    expected = [torch.zeros_like(p) for p in net.parameters()]
    for t in range(batch.num_tasks):
        clone = copy.deepcopy(net)
        for _ in range(steps):
            loss = loss_fn(clone(batch.x_support[t]), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(clone.parameters()))
            with torch.no_grad():
                for p, g in zip(clone.parameters(), grads):
                    p -= alpha * g
        loss = loss_fn(clone(batch.x_query[t]), batch.y_query[t])
        for e, g in zip(expected, torch.autograd.grad(loss, list(clone.parameters()))):
            e += g / batch.num_tasks
    return expected


def test_first_order_equals_query_gradient_at_adapted_params(device):
    gen = torch.Generator().manual_seed(4)
    net = ml.models.MLP(1, (8, 8), 1).double().to(device)
    b = ml.tasks.Sinusoid().sample(4, 5, 5, generator=gen)
    batch = ml.TaskBatch(
        *(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query))
    ).to(device)
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.05, inner_steps=2, first_order=True)
    maml.meta_loss(batch).backward()

    expected = first_order_reference(net, F.mse_loss, batch, alpha=0.05, steps=2)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_second_and_first_order_differ(device):
    net = ml.models.MLP(1, (8, 8), 1).double().to(device)
    b = ml.tasks.Sinusoid().sample(4, 5, 5, generator=torch.Generator().manual_seed(5))
    batch = ml.TaskBatch(
        *(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query))
    ).to(device)
    grads = []
    for first_order in (False, True):
        net.zero_grad()
        ml.MAML(net, F.mse_loss, 0.1, 1, first_order=first_order).meta_loss(
            batch
        ).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert (grads[0] - grads[1]).norm() > 1e-3 * grads[0].norm()


@pytest.mark.parametrize("first_order", [False, True])
def test_batched_meta_loss_equals_mean_of_single_task_losses(device, first_order):
    net = ml.models.MLP(1, (10, 10), 1).double().to(device)
    b = ml.tasks.Sinusoid().sample(6, 5, 7, generator=torch.Generator().manual_seed(6))
    batch = ml.TaskBatch(
        *(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query))
    ).to(device)
    maml = ml.MAML(net, F.mse_loss, 0.05, 2, first_order=first_order)
    batched = maml.meta_loss(batch)
    g_batched = torch.autograd.grad(batched, list(net.parameters()))
    singles = []
    for t in range(batch.num_tasks):  # the one-task path: [K, 1] inputs
        fast = maml.adapt(batch.x_support[t], batch.y_support[t])
        singles.append(
            F.mse_loss(maml.predict(fast, batch.x_query[t]), batch.y_query[t])
        )
    single = torch.stack(singles).mean()
    g_single = torch.autograd.grad(single, list(net.parameters()))
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
    for a, b_ in zip(g_batched, g_single):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_adapt_predict_meta_loss_never_modify_the_module(device):
    net = ml.models.Conv4(1, 5, hidden=8).to(device)
    before = snapshot(net)
    x_s = torch.randn(2, 5, 1, 28, 28, device=device)
    y_s = torch.arange(5, device=device).expand(2, -1)
    maml = ml.MAML(net, F.cross_entropy, inner_lr=0.4, inner_steps=3)
    fast = maml.adapt(x_s, y_s)
    maml.predict(fast, x_s)
    maml.adapt(x_s[0], y_s[0], steps=5)
    loss = maml.meta_loss(ml.TaskBatch(x_s, y_s, x_s, y_s))
    loss.backward()
    assert_bitwise_equal(before, net)
    # adapted tensors are new ones, not views of the module's parameters
    for name, p in net.named_parameters():
        assert fast[name].data_ptr() != p.data_ptr()


def test_adapt_takes_more_steps_at_test_time_and_continues_from_params(device):
    net = ml.models.MLP(1, (8,), 1).double().to(device)
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.05, inner_steps=1)
    b = ml.tasks.Sinusoid().sample(3, 5, 5, generator=torch.Generator().manual_seed(7))
    xs, ys = b.x_support.double().to(device), b.y_support.double().to(device)
    with torch.no_grad():
        ten = maml.adapt(xs, ys, steps=10)
        four_then_six = maml.adapt(xs, ys, steps=6, params=maml.adapt(xs, ys, steps=4))
        zero = maml.adapt(xs, ys, steps=0)
    for k in ten:
        torch.testing.assert_close(ten[k], four_then_six[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(zero[k], net.get_parameter(k).expand_as(zero[k]))
    assert (maml.task_losses(ten, xs, ys) < maml.task_losses(zero, xs, ys)).all()


def test_meta_training_learns_the_sinusoid():
    torch.manual_seed(0)
    net = ml.models.MLP(1, (40, 40), 1)
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.01, inner_steps=1)
    dist = ml.tasks.Sinusoid()
    before = ml.evaluate(maml, dist, steps=(1,), num_tasks=100, seed=1).mean[0]
    ml.meta_train(maml, dist, 300, progress=False, device="cpu")
    after = ml.evaluate(maml, dist, steps=(1,), num_tasks=100, seed=1).mean[0]
    assert after < 0.8 * before


# 3: passes of 3 tasks and of 1, each weighted by its share of the batch
@pytest.mark.parametrize("tasks_per_pass", [1, 2, 3, 4])
def test_step_in_several_passes_gives_the_one_pass_meta_gradient(tasks_per_pass):
    gen = torch.Generator().manual_seed(5)
    tasks, n_way = 4, 3
    x_s = torch.randn(tasks, n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    x_q = torch.randn(tasks, 2 * n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    y_s = torch.arange(n_way).expand(tasks, -1)
    y_q = torch.arange(n_way).repeat(2).expand(tasks, -1)
    batch = ml.TaskBatch(x_s, y_s, x_q, y_q)
    net = ml.models.Conv4(1, n_way, hidden=8).double()
    one = ml.MAML(net, F.cross_entropy, inner_lr=0.4, tasks_per_pass=tasks)
    assert len(one._passes(batch)) == 1
    loss = one.meta_loss(batch)
    loss.backward()
    expected = [p.grad.clone() for p in net.parameters()]
    split = ml.MAML(net, F.cross_entropy, inner_lr=0.4, tasks_per_pass=tasks_per_pass)
    assert len(split._passes(batch)) == -(-tasks // tasks_per_pass)  # ceil
    got = split.step(batch, torch.optim.SGD(net.parameters(), lr=0.0))
    torch.testing.assert_close(got, loss.detach(), rtol=1e-12, atol=0)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "compiled,shared", [(None, False), (True, False), (False, True)]
)
def test_conv4_first_order_meta_gradient_matches_per_task_autograd(
    device, compiled, shared, request, monkeypatch
):
    # First-order MAML on Conv4, all tasks in one pass: every pass is
    # differentiated once, so on CUDA (None) or when forced (True) they run
    # through torch.compile; eager (False) with the first step's convolutions
    # dense over all tasks (shared_conv2d). Against plain autograd, in float64.
    if compiled:
        request.getfixturevalue("needs_compile")
    gen = torch.Generator().manual_seed(8)
    tasks, n_way, alpha, steps = 3, 4, 0.3, 2
    x_s = torch.randn(tasks, n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    x_q = torch.randn(tasks, 2 * n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    y_s = torch.stack([torch.randperm(n_way, generator=gen) for _ in range(tasks)])
    batch = ml.TaskBatch(x_s, y_s, x_q, y_s.repeat(1, 2)).to(device)
    net = ml.models.Conv4(1, n_way, hidden=8).double().to(device)
    maml = ml.MAML(
        net, F.cross_entropy, inner_lr=alpha, inner_steps=steps, first_order=True
    )
    maml._task_by_task = False  # all tasks in one pass, as on CUDA
    maml._compiled_passes = compiled
    maml._shared_first_step = shared
    if shared:
        maml._channels_last = False  # NCHW as on CUDA (shared_conv2d's layout)
    on = device.type == "cuda" if compiled is None else compiled
    assert maml._compiles(batch.x_query) == on
    calls = []
    spy = lambda *args: calls.append(1) or shared_conv2d(*args)  # noqa: E731
    monkeypatch.setattr(ml.inner, "shared_conv2d", spy)
    maml.meta_loss(batch).backward()
    assert len(calls) == (3 if shared else 0)  # as in the second-order test

    # the module itself (batch norm on batch statistics, as in training)
    expected = first_order_reference(net, F.cross_entropy, batch, alpha, steps)
    for (name, p), e in zip(net.named_parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-10, msg=name)


def test_conv4_task_by_task_equals_all_tasks_at_once(device):
    # The CPU's default for Conv4 (one task at a time) against the batched
    # form CUDA runs, in float64: adaptation under no_grad, continuing from
    # adapted weights, predictions, losses, and the meta-gradient.
    gen = torch.Generator().manual_seed(6)
    tasks, n_way = 3, 4
    x_s = torch.randn(tasks, n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    x_q = torch.randn(tasks, 2 * n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    # each task its own labelling, so no task's data passes for another's
    y_s = torch.stack([torch.randperm(n_way, generator=gen) for _ in range(tasks)])
    y_q = y_s.repeat(1, 2)
    batch = ml.TaskBatch(x_s, y_s, x_q, y_q).to(device)
    net = ml.models.Conv4(1, n_way, hidden=8).double().to(device)
    maml = ml.MAML(net, F.cross_entropy, inner_lr=0.4, inner_steps=2)
    assert maml._one_task_per_pass(x_s.to(device), True) == (device.type == "cpu")
    assert not maml._one_task_per_pass(x_s[0].to(device), False)  # one task

    def run(by_task):
        maml._task_by_task = by_task
        net.zero_grad()
        with torch.no_grad():
            fast = maml.adapt(batch.x_support, batch.y_support)
            more = maml.adapt(batch.x_support, batch.y_support, steps=1, params=fast)
            pred = maml.predict(more, batch.x_query)
            losses = maml.task_losses(more, batch.x_query, batch.y_query)
        maml.meta_loss(batch).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        return [*fast.values(), *more.values(), pred, losses, *grads]

    for got, expected in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_cpu_passes_differentiated_once_run_channels_last(monkeypatch):
    # The CPU's Conv4 keeps its activations NHWC in the passes
    # differentiated once (MAML's query set, all of first-order MAML's),
    # NCHW in those differentiated twice (MAML's support set), and CUDA
    # in neither. A spy on the batch norm records each pass's layout.
    from mlbook import inner

    layouts, batch_norm = [], F.batch_norm

    def spy(h, *args, **kwargs):
        layouts.append(h.is_contiguous(memory_format=torch.channels_last))
        return batch_norm(h, *args, **kwargs)

    monkeypatch.setattr(inner.F, "batch_norm", spy)
    net = ml.models.Conv4(1, 5, hidden=4)
    batch = ml.TaskBatch(
        torch.randn(2, 5, 1, 28, 28),
        torch.arange(5).expand(2, -1),
        torch.randn(2, 10, 1, 28, 28),
        torch.arange(5).repeat(2).expand(2, -1),
    )
    for first_order, nhwc in [(False, [False, True]), (True, [True, True])]:
        maml = ml.MAML(net, F.cross_entropy, 0.4, first_order=first_order)
        layouts.clear()
        maml.meta_loss(batch)
        # two tasks, one at a time, support sets first; four norms a pass
        assert layouts == 8 * [nhwc[0]] + 8 * [nhwc[1]]
        maml._channels_last = False
        layouts.clear()
        maml.meta_loss(batch)
        assert not any(layouts)
    maml._channels_last = None  # the default
    x = torch.empty(3, 8, 4, 4)
    assert maml._nhwc(x, False) and not maml._nhwc(x, True)
    meta = x.to("meta")  # stands in for CUDA: NHWC only where asked
    assert not maml._nhwc(meta, False)
    maml._channels_last = True
    assert maml._nhwc(meta, False) and maml._nhwc(meta, True)


def test_tasks_per_pass_default_and_checks():
    conv = ml.MAML(ml.models.Conv4(1, 5, hidden=8), F.cross_entropy, 0.4)
    mlp = ml.MAML(ml.models.MLP(1, (8,), 1), F.mse_loss, 0.1, inner_steps=2)
    images = ml.TaskBatch(
        torch.zeros(6, 5, 1, 28, 28),
        torch.zeros(6, 5, dtype=torch.long),
        torch.zeros(6, 5, 1, 28, 28),
        torch.zeros(6, 5, dtype=torch.long),
    )
    points = ml.TaskBatch(*(torch.zeros(6, 4, 1) for _ in range(4)))
    assert len(conv._passes(images)) == 6  # Conv4 on the CPU: task by task
    assert len(mlp._passes(points)) == 1  # the rest: all tasks in one pass
    conv._task_by_task = False  # Conv4 all tasks at once (as on CUDA)
    assert len(conv._passes(images)) == 1
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="tasks_per_pass"):
            ml.MAML(ml.models.MLP(1, (8,), 1), F.mse_loss, 0.1, tasks_per_pass=bad)
