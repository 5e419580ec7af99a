"""The closed-form MLP meta-gradient (mlbook.mlp_grad) against autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlbook as ml
from mlbook.mlp_grad import (
    adam_update,
    maml_adam_step,
    relu_mlp_meta_grad,
    reptile_step,
)


def regression_batch(tasks, k, q, d_in, d_out, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return ml.TaskBatch(
        r(tasks, k, d_in), r(tasks, k, d_out), r(tasks, q, d_in), r(tasks, q, d_out)
    )


def autograd_step_grads(net, batch, alpha, first_order):
    """The meta-gradient by plain autograd, one task at a time (no mlbook)."""
    params = dict(net.named_parameters())
    total = 0.0
    for t in range(batch.num_tasks):
        loss = F.mse_loss(
            torch.func.functional_call(net, params, batch.x_support[t]),
            batch.y_support[t],
        )
        grads = torch.autograd.grad(
            loss, list(params.values()), create_graph=not first_order
        )
        fast = {k: p - alpha * g for (k, p), g in zip(params.items(), grads)}
        total = total + F.mse_loss(
            torch.func.functional_call(net, fast, batch.x_query[t]), batch.y_query[t]
        )
    loss = total / batch.num_tasks
    return loss, torch.autograd.grad(loss, list(params.values()))


@pytest.mark.parametrize("hidden", [(), (7,), (40, 40), (5, 6, 4), (1, 4)])
@pytest.mark.parametrize("first_order", [False, True])
# sizes of 1 take the broadcast (not matrix-product) branches of mlp_grad
@pytest.mark.parametrize("d_in,d_out", [(2, 3), (1, 1)])
def test_closed_form_equals_autograd_in_float64(hidden, first_order, d_in, d_out):
    net = ml.models.MLP(d_in, hidden, d_out).double()
    batch = regression_batch(4, 6, 9, d_in, d_out, seed=len(hidden))
    expected_loss, expected = autograd_step_grads(net, batch, 0.3, first_order)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    loss, g_w, g_b = relu_mlp_meta_grad(
        [m.weight.detach() for m in linears],
        [m.bias.detach() for m in linears],
        batch.x_support,
        batch.y_support,
        batch.x_query,
        batch.y_query,
        0.3,
        first_order,
    )
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=0)
    got = [g for pair in zip(g_w, g_b) for g in pair]  # net's order: W1, b1, W2, ...
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)


def test_maml_step_uses_it_and_leaves_the_same_grads_as_meta_loss():
    net = ml.models.MLP(1, (40, 40), 1).double()
    b = ml.tasks.Sinusoid().sample(
        5, 10, 10, generator=torch.Generator().manual_seed(1)
    )
    batch = ml.TaskBatch(
        *(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query))
    )
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    assert maml._explicit_layers(batch) is not None
    loss = maml.step(batch, torch.optim.SGD(net.parameters(), lr=0.0))
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    expected = maml.meta_loss(batch)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    for a, p in zip(got, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-13)


def test_other_models_and_settings_take_the_general_path():
    batch = regression_batch(3, 5, 5, 1, 1, seed=0, dtype=torch.float32)
    relu = ml.models.MLP(1, (8,), 1)
    tanh = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    no_bias = nn.Sequential(nn.Linear(1, 8, bias=False), nn.ReLU(), nn.Linear(8, 1))

    class MetaSGDLike(ml.MAML):
        def inner_update(self, params, grads):
            return {k: p - 0.5 * self.inner_lr * grads[k] for k, p in params.items()}

    assert ml.MAML(relu, F.mse_loss, 0.1)._explicit_layers(batch) is not None
    for learner in (
        ml.MAML(tanh, F.mse_loss, 0.1),
        ml.MAML(no_bias, F.mse_loss, 0.1),
        ml.MAML(relu, F.mse_loss, 0.1, inner_steps=2),
        ml.MAML(relu, F.l1_loss, 0.1),
        MetaSGDLike(relu, F.mse_loss, 0.1),
    ):
        assert learner._explicit_layers(batch) is None
    # targets that mse_loss would broadcast are left to the general path too
    squeezed = ml.TaskBatch(
        batch.x_support, batch.y_support[..., 0], batch.x_query, batch.y_query[..., 0]
    )
    assert ml.MAML(relu, F.mse_loss, 0.1)._explicit_layers(squeezed) is None


def test_explicit_step_still_refuses_nan():
    net = ml.models.MLP(1, (8,), 1)
    batch = regression_batch(2, 5, 5, 1, 1, seed=0, dtype=torch.float32)
    batch.x_query[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        ml.MAML(net, F.mse_loss, 0.1).meta_step(
            batch, torch.optim.SGD(net.parameters(), lr=0.1)
        )


def test_compiled_step_gives_the_eager_step():
    # torch.compile needs a C++ compiler; without one MAML warns and runs eager,
    # which this check accepts too: either way the numbers must agree.
    b = ml.tasks.Sinusoid().sample(
        25, 10, 10, generator=torch.Generator().manual_seed(2)
    )
    grads = []
    for compile in (False, True):
        torch.manual_seed(0)
        net = ml.models.MLP(1, (40, 40), 1)
        maml = ml.MAML(net, F.mse_loss, inner_lr=0.01, compile=compile)
        maml.step(b, torch.optim.SGD(net.parameters(), lr=0.0))
        grads.append([p.grad for p in net.parameters()])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_update_equals_torch_adam_in_float64(weight_decay):
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(4, 3), (3,)]]
    mine = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(
        theirs, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay
    )
    state = (
        [torch.zeros_like(p) for p in mine],
        [torch.zeros_like(p) for p in mine],
        [torch.tensor(0.0) for _ in mine],
    )
    hyper = (0.8, 0.95, 1e-6, weight_decay)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in mine]
        adam_update(
            mine,
            grads,
            *state,
            torch.tensor(0.05, dtype=torch.float64),
            hyper,
            torch.tensor(True),
        )
        for p, gr in zip(theirs, grads):
            p.grad = gr.clone()
        opt.step()
    for i, p in enumerate(theirs):
        st = opt.state[p]
        torch.testing.assert_close(mine[i], p.detach(), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(state[0][i], st["exp_avg"], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(
            state[1][i], st["exp_avg_sq"], rtol=1e-13, atol=1e-15
        )
        assert state[2][i].item() == st["step"].item() == 4


def test_fused_step_leaves_everything_as_it_was_when_the_loss_is_not_finite():
    net = ml.models.MLP(1, (8,), 1)
    batch = regression_batch(2, 5, 5, 1, 1, seed=0, dtype=torch.float32)
    batch.x_query[0, 0, 0] = float("nan")
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights = [m.weight.detach() for m in linears]
    biases = [m.bias.detach() for m in linears]
    params = weights + biases
    state = (
        [torch.ones_like(p) for p in params],
        [torch.ones_like(p) for p in params],
        [torch.tensor(3.0) for _ in params],
    )
    before = [t.clone() for t in params + state[0] + state[1] + state[2]]
    loss, _, _ = maml_adam_step(
        weights,
        biases,
        state,
        batch.x_support,
        batch.y_support,
        batch.x_query,
        batch.y_query,
        0.1,
        False,
        torch.tensor(0.1, dtype=torch.float64),
        (0.9, 0.999, 1e-8, 0.0),
    )
    assert not torch.isfinite(loss)
    for a, b in zip(params + state[0] + state[1] + state[2], before):
        assert torch.equal(a, b)


def test_fused_adam_only_for_a_plain_adam_over_exactly_the_model():
    net = ml.models.MLP(1, (8,), 1)
    params = list(net.parameters())
    maml = ml.MAML(net, F.mse_loss, 0.1, compile=True)
    assert maml._adam(torch.optim.Adam(params), params) is not None
    assert ml.MAML(net, F.mse_loss, 0.1)._adam(torch.optim.Adam(params), params) is None
    for opt in (
        torch.optim.AdamW(params),
        torch.optim.Adam(params, amsgrad=True),
        torch.optim.Adam(params, maximize=True),
        torch.optim.Adam(params, lr=torch.tensor(0.01)),
        torch.optim.Adam(params[:2]),
        torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}]),
        torch.optim.SGD(params, lr=0.1),
    ):
        assert maml._adam(opt, params) is None
    try:  # AdamW's decay as an Adam flag (newer torch): not the fused step's
        decoupled = torch.optim.Adam(params, decoupled_weight_decay=True)
    except TypeError:
        return
    assert maml._adam(decoupled, params) is None


def test_compiled_adam_step_gives_torch_adam_and_keeps_its_state_format():
    # Three compiled steps (meta-gradient and Adam in one call), then two eager
    # steps with torch's own Adam on the same optimizer, must give five eager
    # steps: the state the fused step keeps is Adam's. Without a C++ compiler
    # the fused function runs eagerly, which this accepts too.
    b = ml.tasks.Sinusoid().sample(
        25, 10, 10, generator=torch.Generator().manual_seed(2)
    )
    finals = []
    for compiled_steps in (0, 3):
        torch.manual_seed(0)
        net = ml.models.MLP(1, (40, 40), 1)
        opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
        maml = ml.MAML(net, F.mse_loss, inner_lr=0.01, compile=True)
        for i in range(5):
            maml.compile = i < compiled_steps
            maml.step(b, opt)
        finals.append([p.detach().clone() for p in net.parameters()])
        assert all(opt.state[p]["step"].item() == 5 for p in net.parameters())
    for a, c in zip(*finals):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def autograd_reptile(net, batch, alpha, steps, x_eval, y_eval):
    """Each task's loss at its adapted weights and theta - mean_t phi_t, by plain
    autograd one task at a time (no mlbook)."""
    theta = {k: p.detach() for k, p in net.named_parameters()}
    losses, phis = [], []
    for t in range(batch.num_tasks):
        phi = dict(theta)
        for _ in range(steps):
            phi = {k: p.requires_grad_() for k, p in phi.items()}
            loss = F.mse_loss(
                torch.func.functional_call(net, phi, batch.x_support[t]),
                batch.y_support[t],
            )
            grads = torch.autograd.grad(loss, list(phi.values()))
            phi = {k: (p - alpha * g).detach() for (k, p), g in zip(phi.items(), grads)}
        pred = torch.func.functional_call(net, phi, x_eval[t])
        losses.append(F.mse_loss(pred, y_eval[t]).detach())
        phis.append(phi)
    directions = [theta[k] - torch.stack([ph[k] for ph in phis]).mean(0) for k in theta]
    return torch.stack(losses), directions


@pytest.mark.parametrize("hidden", [(), (7,), (40, 40), (1, 4)])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("d_in,d_out", [(2, 3), (1, 1)])
def test_closed_form_reptile_equals_autograd_in_float64(hidden, steps, d_in, d_out):
    net = ml.models.MLP(d_in, hidden, d_out).double()
    batch = regression_batch(4, 6, 9, d_in, d_out, seed=len(hidden))
    expected_losses, expected = autograd_reptile(
        net, batch, 0.3, steps, batch.x_query, batch.y_query
    )
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights = [m.weight.detach() for m in linears]
    biases = [m.bias.detach() for m in linears]
    before = [p.clone() for p in weights + biases]
    args = (batch.x_support, batch.y_support, batch.x_query, batch.y_query, 0.3, steps)
    losses, directions = reptile_step(weights, biases, *args, None, True)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=0)
    got = directions[: len(weights)], directions[len(weights) :]
    got = [d for pair in zip(*got) for d in pair]  # net's order: W1, b1, W2, ...
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)
    # with outer_lr: theta <- theta - outer_lr * direction, in place
    reptile_step(weights, biases, *args, torch.tensor(0.5, dtype=torch.float64), True)
    for p, b, d in zip(weights + biases, before, directions):
        torch.testing.assert_close(p, b - 0.5 * d, rtol=1e-12, atol=1e-14)


def test_reptile_without_query_points_adapts_and_scores_on_the_support_set():
    net = ml.models.MLP(1, (8,), 1).double()
    full = regression_batch(3, 5, 4, 1, 1, seed=3)
    batch = ml.TaskBatch(
        full.x_support, full.y_support, full.x_support[:, :0], full.y_support[:, :0]
    )
    reptile = ml.Reptile(net, F.mse_loss, inner_lr=0.1, inner_steps=3)
    assert reptile._mlp_layers(batch, batch.x_support, batch.y_support) is not None
    expected_losses, _ = autograd_reptile(
        net, batch, 0.1, 3, batch.x_support, batch.y_support
    )
    loss = reptile.meta_step(batch)
    assert loss == pytest.approx(expected_losses.mean().item(), rel=1e-12)


def test_closed_form_reptile_refuses_nan_and_leaves_the_model_as_it_was():
    net = ml.models.MLP(1, (8,), 1)
    batch = regression_batch(2, 5, 5, 1, 1, seed=0, dtype=torch.float32)
    batch.x_query[0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    for opt in (None, torch.optim.SGD(net.parameters(), lr=0.1)):
        with pytest.raises(FloatingPointError, match="Reptile loss"):
            ml.Reptile(net, F.mse_loss, 0.1).meta_step(batch, opt)
        for p, b in zip(net.parameters(), before):
            assert torch.equal(p.detach(), b)
    # check_finite=False is asked for speed: the update is not held back (the
    # NaN is in a query point, so the adapted weights and the update are finite)
    ml.Reptile(net, F.mse_loss, 0.1, check_finite=False).meta_step(batch)
    assert not all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))


def test_compiled_reptile_step_gives_the_eager_step():
    # Without a C++ compiler Reptile warns and runs eager, which this accepts:
    # either way the numbers must agree, for a float and a tensor outer_lr.
    b = ml.tasks.Sinusoid().sample(
        25, 10, 10, generator=torch.Generator().manual_seed(2)
    )
    finals = []
    for compile in (False, True):
        torch.manual_seed(0)
        net = ml.models.MLP(1, (40, 40), 1)
        reptile = ml.Reptile(net, F.mse_loss, 0.02, 5, outer_lr=0.1, compile=compile)
        for lr in (0.1, 0.05, torch.tensor(0.2)):
            reptile.step(b, outer_lr=lr)
        finals.append([p.detach().clone() for p in net.parameters()])
    for a, c in zip(*finals):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
