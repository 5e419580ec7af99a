"""Reptile and the transfer baseline against plain per-task loops."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mlbook as ml


def double_batch(num_tasks, k, q, seed, device):
    b = ml.tasks.Sinusoid().sample(
        num_tasks, k, q, generator=torch.Generator().manual_seed(seed)
    )
    return ml.TaskBatch(
        *(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query))
    ).to(device)


def reptile_by_hand(net, batch, inner_lr, inner_steps, outer_lr, loss=F.mse_loss):
    """theta + outer_lr * (mean_T phi_T - theta), phi_T from plain SGD per task."""
    phis = []
    for t in range(batch.num_tasks):
        clone = copy.deepcopy(net)
        opt = torch.optim.SGD(clone.parameters(), lr=inner_lr)
        for _ in range(inner_steps):
            opt.zero_grad()
            loss(clone(batch.x_support[t]), batch.y_support[t]).backward()
            opt.step()
        phis.append([p.detach() for p in clone.parameters()])
    return [
        p.detach() + outer_lr * (torch.stack(ph).mean(0) - p.detach())
        for p, ph in zip(net.parameters(), zip(*phis))
    ]


class AutogradReptile(ml.Reptile):
    """Reptile as is; being a subclass, it never takes the closed-form MLP
    step (mlbook.mlp_grad), so the autograd path is tested on the CPU too."""


@pytest.fixture(params=["closed form", "autograd"])
def reptile_cls(request, monkeypatch, device):
    """Each Reptile test runs once per path; the closed form is the CPU's
    default for an MLP, and the other path must not reach it."""
    if request.param == "closed form":
        if device.type != "cpu":
            pytest.skip("the closed-form step is for the CPU")
        return ml.Reptile

    def refuse(*args):
        raise AssertionError("the autograd path took the closed form")

    monkeypatch.setattr("mlbook.reptile.reptile_step", refuse)
    return AutogradReptile


@pytest.mark.parametrize("inner_steps", [1, 4])
def test_reptile_meta_step_equals_per_task_loop(device, inner_steps, reptile_cls):
    net = ml.models.MLP(1, (12, 12), 1).double().to(device)
    batch = double_batch(5, 6, 4, 0, device)
    expected = reptile_by_hand(net, batch, 0.03, inner_steps, 0.5)
    reptile = reptile_cls(
        net, F.mse_loss, inner_lr=0.03, inner_steps=inner_steps, outer_lr=0.5
    )
    reptile.meta_step(batch)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_reptile_conv4_step_equals_per_task_loop(device):
    # Conv4 takes mlbook's own batched forward (on the CPU one task at a
    # time, channels-last, the first layer as a matmul); the module itself,
    # copied per task and trained by plain SGD, is the reference
    gen = torch.Generator().manual_seed(4)
    n_way, tasks = 3, 2
    net = ml.models.Conv4(1, n_way, hidden=4).double().to(device)
    x = torch.randn(tasks, 2 * n_way, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(n_way).repeat(2).expand(tasks, -1)
    batch = ml.TaskBatch(x, y, x[:, :0], y[:, :0]).to(device)
    expected = reptile_by_hand(net, batch, 0.1, 3, 0.5, F.cross_entropy)
    reptile = ml.Reptile(
        net, F.cross_entropy, inner_lr=0.1, inner_steps=3, outer_lr=0.5
    )
    reptile.meta_step(batch)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_reptile_with_an_optimizer_uses_theta_minus_phi_as_gradient(
    device, reptile_cls
):
    net = ml.models.MLP(1, (8,), 1).double().to(device)
    batch = double_batch(3, 5, 5, 1, device)
    # SGD(lr) on the "gradient" theta - mean phi is the plain update with outer_lr=lr
    expected = reptile_by_hand(net, batch, 0.02, 3, 0.25)
    reptile = reptile_cls(net, F.mse_loss, inner_lr=0.02, inner_steps=3, outer_lr=1.0)
    reptile.meta_step(batch, torch.optim.SGD(net.parameters(), lr=0.25))
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_reptile_adapt_does_not_touch_the_model(device):
    net = ml.models.MLP(1, (8,), 1).to(device)
    before = copy.deepcopy(net.state_dict())
    reptile = ml.Reptile(net, F.mse_loss, inner_lr=0.02, inner_steps=3)
    batch = ml.tasks.Sinusoid().sample(2, 5, 5, device=device)
    reptile.adapt(batch.x_support, batch.y_support)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_pretrained_pools_every_point_of_every_task(device):
    net = ml.models.MLP(1, (8,), 1).double().to(device)
    batch = double_batch(4, 5, 3, 2, device)
    pre = ml.Pretrained(net, F.mse_loss, inner_lr=0.01)
    x = torch.cat([batch.x_support, batch.x_query], 1).reshape(-1, 1)
    y = torch.cat([batch.y_support, batch.y_query], 1).reshape(-1, 1)
    torch.testing.assert_close(pre.pooled_loss(batch), F.mse_loss(net(x), y))


def test_fine_tuning_is_the_same_sgd_as_maml_adaptation(device):
    net = ml.models.MLP(1, (8,), 1).double().to(device)
    batch = double_batch(3, 5, 3, 3, device)
    a = ml.Pretrained(net, F.mse_loss, 0.02).adapt(batch.x_support, batch.y_support, 4)
    b = ml.MAML(net, F.mse_loss, 0.02).adapt(batch.x_support, batch.y_support, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_mlp_fast_forward_equals_vmap_forward(device):
    # MLPs take a hand-batched forward; it must give vmap's numbers exactly.
    net = ml.models.MLP(1, (16, 16), 1).double().to(device)
    batch = double_batch(4, 5, 5, 4, device)
    fast = ml.MAML(net, F.mse_loss, 0.05, 2)
    slow = ml.MAML(net, F.mse_loss, 0.05, 2)
    slow._plan = None
    assert fast._plan is not None
    grads = []
    for m in (fast, slow):
        loss = m.meta_loss(batch)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
