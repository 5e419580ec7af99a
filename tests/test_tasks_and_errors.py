"""Task sampling, TaskBatch checks, and clear errors for bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import mlbook as ml


def test_sinusoid_follows_the_maml_protocol():
    batch = ml.tasks.Sinusoid().sample(
        2000, 10, 5, generator=torch.Generator().manual_seed(0)
    )
    amp, phase = batch.info["amplitude"], batch.info["phase"]
    assert batch.x_support.shape == (2000, 10, 1) and batch.x_query.shape == (
        2000,
        5,
        1,
    )
    assert 0.1 <= amp.min() and amp.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert -5 <= batch.x_support.min() and batch.x_support.max() <= 5
    y = amp[:, None, None] * torch.sin(batch.x_query - phase[:, None, None])
    torch.testing.assert_close(batch.y_query, y)


def test_sampling_is_reproducible_and_ranges_overridable():
    dist = ml.tasks.Sinusoid(amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0))
    a = dist.sample(3, 4, 4, generator=torch.Generator().manual_seed(7))
    b = dist.sample(3, 4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.y_query, b.y_query)
    torch.testing.assert_close(a.y_support, torch.sin(a.x_support))
    assert 0 <= a.x_support.min() and a.x_support.max() <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=0, k_support=5, k_query=5), "num_tasks"),
        (dict(num_tasks=2, k_support=0, k_query=5), "k_support"),
        (dict(num_tasks=2, k_support=5, k_query=-1), "k_query"),
        (dict(num_tasks=2.5, k_support=5, k_query=5), "num_tasks"),
    ],
)
def test_sinusoid_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ml.tasks.Sinusoid().sample(**kwargs)


def test_sinusoid_rejects_reversed_range():
    with pytest.raises(ValueError, match="amplitude"):
        ml.tasks.Sinusoid(amplitude=(5.0, 0.1))


def test_taskbatch_rejects_inconsistent_shapes():
    x = torch.zeros(3, 4, 1)
    with pytest.raises(ValueError, match="number of tasks"):
        ml.TaskBatch(x, x, torch.zeros(2, 4, 1), torch.zeros(2, 4, 1))
    with pytest.raises(ValueError, match="leading"):
        ml.TaskBatch(x, torch.zeros(3, 5, 1), x, x)
    with pytest.raises(ValueError, match="empty"):
        ml.TaskBatch(torch.zeros(3, 0, 1), torch.zeros(3, 0, 1), x, x)
    with pytest.raises(ValueError, match="same shape"):
        ml.TaskBatch(x, x, torch.zeros(3, 4, 2), x)
    with pytest.raises(TypeError, match="x_support"):
        ml.TaskBatch([1], x, x, x)


@pytest.fixture
def maml():
    return ml.MAML(ml.models.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inner_lr=0.0), "inner_lr"),
        (dict(inner_lr=-1.0), "inner_lr"),
        (dict(inner_lr=float("nan")), "inner_lr"),
        (dict(inner_lr=float("inf")), "inner_lr"),
        (dict(inner_steps=-1), "inner_steps"),
        (dict(inner_steps=1.5), "inner_steps"),
    ],
)
def test_maml_rejects_bad_hyperparameters(kwargs, match):
    args = dict(inner_lr=0.01, inner_steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        ml.MAML(ml.models.MLP(1, (8,), 1), F.mse_loss, **args)


def test_reptile_rejects_bad_hyperparameters():
    net = ml.models.MLP(1, (8,), 1)
    with pytest.raises(ValueError, match="outer_lr"):
        ml.Reptile(net, F.mse_loss, inner_lr=0.01, outer_lr=0)
    with pytest.raises(ValueError, match="inner_steps"):
        ml.Reptile(net, F.mse_loss, inner_lr=0.01, inner_steps=0)


def test_adapt_rejects_bad_shapes(maml):
    with pytest.raises(ValueError, match="x_support"):
        maml.adapt(torch.zeros(2, 3, 4, 1), torch.zeros(2, 3, 4, 1))  # too many dims
    with pytest.raises(ValueError, match="disagree"):
        maml.adapt(torch.zeros(5, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="disagree"):
        maml.adapt(torch.zeros(3, 5, 1), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match="empty"):
        maml.adapt(torch.zeros(0, 1), torch.zeros(0, 1))
    with pytest.raises(ValueError, match="steps"):
        maml.adapt(torch.zeros(5, 1), torch.zeros(5, 1), steps=-2)
    with pytest.raises(TypeError, match="y_support"):
        maml.adapt(torch.zeros(5, 1), [0.0] * 5)


def test_meta_loss_rejects_mismatched_query(maml):
    xs = torch.zeros(2, 5, 1)
    with pytest.raises(ValueError, match="same shape"):
        maml.meta_loss(
            ml.TaskBatch(xs, xs, torch.zeros(2, 5, 1, 1), torch.zeros(2, 5, 1, 1))
        )
    with pytest.raises(ValueError, match="x_support"):  # one task where a batch is due
        maml.meta_loss(ml.TaskBatch(xs[0], xs[0], xs[0], xs[0]))
    with pytest.raises(ValueError, match="query"):
        maml.meta_loss(ml.TaskBatch(xs, xs, torch.zeros(2, 0, 1), torch.zeros(2, 0, 1)))
    with pytest.raises(TypeError, match="TaskBatch"):
        maml.meta_loss((xs, xs, xs, xs))


def test_diverging_inner_loop_raises_a_named_error():
    net = ml.models.MLP(1, (8,), 1)
    maml = ml.MAML(net, F.mse_loss, inner_lr=1e30, inner_steps=3)
    batch = ml.tasks.Sinusoid().sample(2, 5, 5)
    with pytest.raises(FloatingPointError, match="inner_lr"):
        maml.meta_loss(batch)
    nan = ml.TaskBatch(*(torch.full((2, 5, 1), float("nan")) for _ in range(4)))
    with pytest.raises(FloatingPointError, match="NaN"):
        ml.MAML(net, F.mse_loss, 0.01).meta_loss(nan)


def test_running_stat_batchnorm_is_refused_before_it_is_modified():
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )
    before = net[1].running_mean.clone()
    with pytest.raises(ValueError, match="track_running_stats"):
        ml.MAML(net, F.mse_loss, 0.01).adapt(torch.randn(5, 1), torch.randn(5, 1))
    assert torch.equal(net[1].running_mean, before)


def test_model_without_linear_or_conv_needs_example_dims():
    net = torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Identity())
    net.w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="example_dims"):
        ml.MAML(net, F.mse_loss, 0.01).adapt(torch.zeros(5, 1), torch.zeros(5, 1))


class _HeadFirst(torch.nn.Module):
    """An image model whose classifier is registered before its convolution."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 3)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    def forward(self, x):
        return self.head(self.body(x))


def test_example_dims_read_off_the_wrong_layer_says_so():
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 1, 8, 8), torch.randint(0, 3, (2, 6))
    guessed = ml.MAML(_HeadFirst(), F.cross_entropy, 0.1)
    assert guessed.example_dims == 1  # from the head: wrong for images
    with pytest.raises(ValueError, match=r"read off head \(Linear\).*example_dims="):
        guessed.adapt(x, y)
    told = ml.MAML(_HeadFirst(), F.cross_entropy, 0.1, example_dims=3)
    fast = told.adapt(x, y)
    assert fast["body.0.weight"].shape == (2, 4, 1, 3, 3)  # one set per task


def test_bad_model_and_loss_types():
    with pytest.raises(TypeError, match="nn.Module"):
        ml.MAML(lambda x: x, F.mse_loss, 0.01)
    with pytest.raises(TypeError, match="loss_fn"):
        ml.MAML(ml.models.MLP(1, (4,), 1), "mse", 0.01)


def test_evaluate_raises_when_adaptation_diverges():
    net = ml.models.MLP(1, (8,), 1)
    maml = ml.MAML(net, F.mse_loss, inner_lr=1e30)
    with pytest.raises(FloatingPointError, match="diverged"):
        ml.evaluate(maml, ml.tasks.Sinusoid(), steps=(0, 5), num_tasks=4)


def test_inner_update_is_the_hook_for_new_inner_rules():
    # A Meta-SGD-style rule: a learned rate per parameter tensor.
    class PerTensorRate(ml.MAML):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rates = {
                k: torch.tensor(self.inner_lr, requires_grad=True)
                for k in self.params()
            }

        def inner_update(self, params, grads):
            return {k: p - self.rates[k] * grads[k] for k, p in params.items()}

    net = ml.models.MLP(1, (8,), 1)
    batch = ml.tasks.Sinusoid().sample(
        3, 5, 5, generator=torch.Generator().manual_seed(0)
    )
    learner = PerTensorRate(net, F.mse_loss, inner_lr=0.01)
    learner.meta_loss(batch).backward()
    assert all(r.grad is not None and r.grad != 0 for r in learner.rates.values())
    plain = ml.MAML(net, F.mse_loss, inner_lr=0.01).meta_loss(batch)
    torch.testing.assert_close(learner.meta_loss(batch), plain)


def test_task_and_tasks_pick_along_the_task_dim_with_info():
    b = ml.tasks.Sinusoid().sample(5, 3, 2, generator=torch.Generator().manual_seed(0))
    part = b.tasks(slice(1, 4))
    assert part.num_tasks == 3 and part.x_query.shape == (3, 2, 1)
    assert torch.equal(part.y_support, b.y_support[1:4])
    assert torch.equal(part.info["phase"], b.info["phase"][1:4])
    one = b.task(4)
    assert one.num_tasks == 1 and torch.equal(one.x_support, b.x_support[4:])


def test_frozen_parameters_are_refused_before_anything_moves():
    # Some paths would move a requires_grad=False weight (hand-written
    # gradients, Reptile's step) and others not: every one refuses it.
    batch = ml.tasks.Sinusoid().sample(3, 5, 5)
    for make in (
        lambda net: ml.MAML(net, F.mse_loss, 0.01),  # closed-form MLP step
        lambda net: ml.Reptile(net, F.mse_loss, 0.01, inner_steps=2),
    ):
        net = ml.models.MLP(1, (8,), 1)
        net[0].weight.requires_grad_(False)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        learner = make(net)
        with pytest.raises(ValueError, match=r"\['0.weight'\].*requires_grad"):
            learner.meta_step(batch, torch.optim.Adam(net.parameters(), 1e-2))
        with pytest.raises(ValueError, match="requires_grad"):
            learner.adapt(batch.x_support, batch.y_support)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_instance_norm_with_running_stats_is_refused_before_it_is_modified():
    net = torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3),
        torch.nn.InstanceNorm1d(4, track_running_stats=True),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 1),
    )
    before = net[1].running_mean.clone()
    maml = ml.MAML(net, F.mse_loss, 0.1)
    with pytest.raises(ValueError, match="InstanceNorm1d.*track_running_stats"):
        maml.adapt(torch.randn(5, 1, 8), torch.randn(5, 1))
    with pytest.raises(ValueError, match="track_running_stats"):
        maml.meta_loss(
            ml.TaskBatch(*(torch.randn(2, 5, *s) for s in ((1, 8), (1,), (1, 8), (1,))))
        )
    assert torch.equal(net[1].running_mean, before)


def test_params_missing_a_weight_are_refused():
    maml = ml.MAML(ml.models.MLP(1, (8,), 1), F.mse_loss, 0.01)
    b = ml.tasks.Sinusoid().sample(2, 5, 5)
    fast = maml.adapt(b.x_support, b.y_support)  # {name: [2, ...]}
    del fast["2.bias"]
    with pytest.raises(ValueError, match=r"lacks .*\['2.bias'\]"):
        maml.predict(fast, b.x_query)  # batched path
    with pytest.raises(ValueError, match=r"lacks .*\['2.bias'\]"):
        maml.predict({k: v[0] for k, v in fast.items()}, b.x_query[0])  # one task


def test_batched_cross_entropy_is_f_cross_entropy_per_task():
    # ignore_index (-100) labels and soft targets, as F.cross_entropy has them
    torch.manual_seed(0)
    maml = ml.MAML(ml.models.MLP(3, (8,), 3).double(), F.cross_entropy, 0.1)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4))
    labels[0, :2] = -100
    soft = torch.softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1)
    params = maml.params()
    for y in (labels, soft):
        batched = maml.task_losses(params, x, y)  # [2]
        one_by_one = torch.stack(
            [maml.task_losses(params, x[i], y[i]) for i in range(2)]
        )
        torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=0)


def test_float64_targets_on_a_float32_mlp_step_as_autograd_does():
    # the closed-form MLP step steps aside; the update is autograd's
    b = ml.tasks.Sinusoid().sample(3, 4, 5)
    b64 = ml.TaskBatch(b.x_support, b.y_support.double(), b.x_query, b.y_query.double())
    torch.manual_seed(0)
    net = ml.models.MLP(1, (8,), 1)
    reference = ml.models.MLP(1, (8,), 1)
    reference.load_state_dict(net.state_dict())
    ml.MAML(net, F.mse_loss, 0.01).meta_step(
        b64, torch.optim.SGD(net.parameters(), 1.0)
    )
    maml = ml.MAML(reference, F.mse_loss, 0.01)
    grads = torch.autograd.grad(maml.meta_loss(b64), list(reference.parameters()))
    for p, q, g in zip(net.parameters(), reference.parameters(), grads):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q - g.float(), rtol=1e-5, atol=1e-6)
