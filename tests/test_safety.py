"""What a user can get wrong, and what must never happen to what a user has:
bad input gets a clear error before any compute; checkpoints, records and
models are never replaced by worse ones or lost silently."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlbook as ml
from mlbook import reproduce


def maml(net=None, **kwargs):
    torch.manual_seed(0)
    net = net if net is not None else ml.models.MLP(1, (8,), 1)
    return ml.MAML(net, F.mse_loss, inner_lr=0.01, **kwargs)


def sine_batch(num_tasks=3, k=5):
    return ml.tasks.Sinusoid().sample(
        num_tasks, k, k, generator=torch.Generator().manual_seed(1)
    )


# -- a model is computed as it is, whatever its structure ----------------------
def test_an_activation_used_twice_in_a_sequential_is_run_twice():
    torch.manual_seed(0)
    act = nn.ReLU()
    net = nn.Sequential(nn.Linear(1, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 1))
    learner = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    batch = sine_batch()
    params = {k: v.expand(3, *v.shape) for k, v in learner.params().items()}
    got = learner.predict(params, batch.x_query)
    want = torch.stack([net(batch.x_query[t]) for t in range(3)])
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        all_at_once = learner.adapt(batch.x_support, batch.y_support)
        first = learner.adapt(batch.x_support[0], batch.y_support[0])
    for k in first:
        torch.testing.assert_close(all_at_once[k][0], first[k])


def test_a_module_with_weights_used_twice_is_refused_but_tied_weights_work():
    lin = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="module '0' again at '2'"):
        ml.MAML(nn.Sequential(lin, nn.Tanh(), lin), F.mse_loss, inner_lr=0.01)
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    b.weight = a.weight  # the way to share: one parameter, two modules
    net = nn.Sequential(a, nn.Tanh(), b)
    learner = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    batch = sine_batch()
    learner.meta_loss(batch).backward()
    assert net[0].weight is net[2].weight and isinstance(a.weight, nn.Parameter)
    torch.testing.assert_close(
        learner.predict(learner.params(), batch.x_query[0]), net(batch.x_query[0])
    )


# -- bad input: a clear error before any compute ------------------------------
def test_targets_of_another_shape_are_refused_not_broadcast():
    learner = maml()
    b = sine_batch(num_tasks=5, k=5)
    flat = ml.TaskBatch(b.x_support, b.y_support[..., 0], b.x_query, b.y_query[..., 0])
    with pytest.raises(ValueError, match="same shape"):
        learner.meta_loss(flat)
    with pytest.raises(ValueError, match="same shape"):
        learner.adapt(b.x_support[0], b.y_support[0].expand(5, 3))


def test_accuracy_needs_class_scores_and_labels_the_model_has():
    with pytest.raises(ValueError, match="class scores"):
        ml.evaluate(maml(), ml.tasks.Sinusoid(), num_tasks=4, metric="accuracy")
    torch.manual_seed(0)
    conv = ml.MAML(ml.models.Conv4(1, 3, hidden=4, image_size=16), F.cross_entropy, 0.1)
    labels = torch.arange(5).repeat(2, 1)  # 5 classes for a 3-class model
    x = torch.randn(2, 5, 1, 16, 16)
    batch = ml.TaskBatch(x, labels, x, labels)
    with pytest.raises(ValueError, match="3 classes"):
        ml.evaluate(conv, batch, steps=(0,), metric="accuracy")


def test_dtype_device_and_optimizer_mistakes_are_named():
    learner = maml()
    b = sine_batch()
    with pytest.raises(ValueError, match="float64 but the model's parameters are"):
        learner.adapt(b.x_support.double(), b.y_support.double())
    with pytest.raises(ValueError, match="y_support is on meta"):
        learner.adapt(b.x_support, torch.empty(b.y_support.shape, device="meta"))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        learner.meta_step(b, None)
    with pytest.raises(ValueError, match="2 features per example"):
        learner.adapt(b.x_support.expand(-1, -1, 2), b.y_support)
    conv = ml.MAML(ml.models.Conv4(3, 5, hidden=4, image_size=16), F.cross_entropy, 0.1)
    with pytest.raises(ValueError, match="1 channels per example"):
        conv.adapt(torch.randn(2, 5, 1, 16, 16), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.int64 but the model's parameters"):
        learner.adapt(b.x_support.long(), b.y_support)
    # integer inputs are fine for a model that embeds them
    embed = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(1), nn.Linear(8, 1))
    tokens = ml.MAML(embed, F.mse_loss, 0.1, example_dims=1)
    x = torch.randint(0, 10, (3, 5, 2))
    tokens.meta_loss(ml.TaskBatch(x, torch.randn(3, 5, 1), x, torch.randn(3, 5, 1)))
    with pytest.raises(ValueError, match="example_dims"):
        ml.MAML(ml.models.MLP(1, (4,), 1), F.mse_loss, 0.1, example_dims="1")


def test_sinusoid_ranges_and_parameters_are_checked():
    with pytest.raises(ValueError, match="amplitude must be a"):
        ml.tasks.Sinusoid(amplitude=5)
    with pytest.raises(ValueError, match="3 amplitudes but 2 phases"):
        ml.tasks.Sinusoid().make_batch([1.0, 2.0, 3.0], [0.0, 1.0], 5, 5)


def test_batched_params_must_match_the_tasks_they_are_used_on():
    learner = maml()
    b = sine_batch(num_tasks=3)
    with torch.no_grad():
        fast = learner.adapt(b.x_support, b.y_support)  # 3 tasks
    with pytest.raises(ValueError, match="x is one task"):
        learner.task_losses(fast, b.x_query[0], b.y_query[0])
    two = b.tasks(slice(0, 2))
    with pytest.raises(ValueError, match="params hold 3 tasks but x holds 2"):
        learner.task_losses(fast, two.x_query, two.y_query)
    with pytest.raises(ValueError, match="params hold 3 tasks but x holds 2"):
        learner.adapt(two.x_support, two.y_support, params=fast)


def test_a_batch_has_tasks_and_task_indices_count_from_either_end():
    b = sine_batch(num_tasks=3)
    with pytest.raises(ValueError, match="no tasks"):
        ml.TaskBatch(b.x_support[:0], b.y_support[:0], b.x_query[:0], b.y_query[:0])
    with pytest.raises(ValueError, match="no tasks"):
        b.tasks(slice(3, 5))
    assert torch.equal(b.task(-1).x_support, b.x_support[2:])
    assert torch.equal(b.task(torch.tensor(1)).x_support, b.x_support[1:2])
    for bad in (3, -4, 1.0, True):
        with pytest.raises(IndexError):
            b.task(bad)


def test_reptile_outer_lr_and_meta_train_outer_lr_are_checked():
    torch.manual_seed(0)
    reptile = ml.Reptile(ml.models.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01)
    before = [p.clone() for p in reptile.model.parameters()]
    for bad in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="outer_lr"):
            reptile.step(sine_batch(), outer_lr=bad)
    assert all(torch.equal(a, p) for a, p in zip(before, reptile.model.parameters()))
    with pytest.raises(ValueError, match="outer_lr"):
        ml.meta_train(reptile, ml.tasks.Sinusoid(), 2, outer_lr=-1.0, progress=False)


def test_evaluate_checks_its_knobs():
    dist = ml.tasks.Sinusoid()
    for kwargs, match in [
        (dict(chunk=0), "chunk"),
        (dict(chunk=2.5), "chunk"),
        (dict(k_query=0), "k_query"),
        (dict(seed=None), "seed"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            ml.evaluate(maml(), dist, num_tasks=4, **kwargs)
    with pytest.raises(TypeError, match="sequence"):
        ml.evaluate(maml(), dist, steps=5, num_tasks=4)


# -- adapt returns new tensors, never the model's own --------------------------
@pytest.mark.parametrize("grad_mode", [True, False])
def test_adapt_with_zero_steps_returns_copies(grad_mode):
    learner = maml()
    b = sine_batch()
    before = {k: p.detach().clone() for k, p in learner.params().items()}
    with torch.set_grad_enabled(grad_mode):
        for x, y in ((b.x_support[0], b.y_support[0]), (b.x_support, b.y_support)):
            fast = learner.adapt(x, y, steps=0)
            for k, p in learner.params().items():
                assert fast[k] is not p
                with torch.no_grad():
                    fast[k].zero_()  # writing to the result leaves the model be
    for k, p in learner.params().items():
        assert torch.equal(p, before[k])


# -- checkpoints: never replaced by a worse one, never resumed into a mismatch --
def run(learner, ckpt, iterations, **kwargs):
    args = dict(num_tasks=2, k_support=5, k_query=5, device="cpu", progress=False)
    return ml.meta_train(
        learner, ml.tasks.Sinusoid(), iterations, checkpoint=ckpt, **args | kwargs
    )


def test_a_diverging_run_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "run.pt"
    run(maml(), ckpt, 4)
    good = ckpt.read_bytes()
    wild = maml(inner_steps=3, check_finite=False)
    wild.inner_lr = 1e6  # (set after the constructor's check, as a bug might)
    with pytest.raises(FloatingPointError, match="diverged"):
        run(wild, tmp_path / "wild.pt", 6, checkpoint_every=1)
    assert not (tmp_path / "wild.pt").exists()  # nothing saved past the last finite
    with pytest.raises(ValueError, match="inner_lr"):  # a changed setting is refused
        run(wild, ckpt, 6)
    assert ckpt.read_bytes() == good


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(learner=lambda: maml(first_order=True)), "first_order"),
        (dict(learner=lambda: maml(inner_steps=2)), "inner_steps"),
        (dict(tasks=ml.tasks.Sinusoid(amplitude=(0.1, 2.0))), "tasks"),
        (dict(outer_lr=0.5), "optimizer settings.*lr: 0.001 there, 0.5 here"),
        (dict(optimizer="adam-wd"), "weight_decay: 0 there, 0.5 here"),
        (dict(learner=lambda: maml(ml.models.MLP(1, (9,), 1))), "another model"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(iterations=3), "past the 3 asked for"),
    ],
)
def test_resuming_with_other_settings_is_refused_before_anything_loads(
    tmp_path, change, match
):
    ckpt = tmp_path / "run.pt"
    run(maml(), ckpt, 5)
    saved = ckpt.read_bytes()
    learner = change.get("learner", maml)()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    kwargs = {k: v for k, v in change.items() if k in ("outer_lr", "iterations")}
    if change.get("optimizer") == "sgd":
        kwargs["optimizer"] = torch.optim.SGD(learner.model.parameters(), lr=1e-3)
    if change.get("optimizer") == "adam-wd":  # the same lr, other settings
        kwargs["optimizer"] = torch.optim.Adam(
            learner.model.parameters(), lr=1e-3, weight_decay=0.5
        )
    with pytest.raises(ValueError, match=match):
        ml.meta_train(
            learner,
            change.get("tasks", ml.tasks.Sinusoid()),
            kwargs.pop("iterations", 8),
            num_tasks=2,
            k_support=5,
            k_query=5,
            device="cpu",
            progress=False,
            checkpoint=ckpt,
            **kwargs,
        )
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    assert ckpt.read_bytes() == saved


def test_unreadable_or_foreign_files_are_named_not_loaded(tmp_path):
    ckpt = tmp_path / "run.pt"
    run(maml(), ckpt, 3)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:100])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    plain = tmp_path / "plain.pt"
    torch.save(maml().model.state_dict(), plain)
    for path, match in (
        (truncated, "cannot be read"),
        (empty, "cannot be read"),
        (plain, "not a meta_train checkpoint"),
    ):
        with pytest.raises(ValueError, match=match):
            run(maml(), path, 5)


class LearnedRate(ml.MAML):
    """A learned inner rate kept beside the model (the inner_update hook)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_rate = torch.zeros((), requires_grad=True)

    def inner_update(self, params, grads):
        rate = self.inner_lr * self.log_rate.exp()
        return {k: p - rate * grads[k] for k, p in params.items()}


def test_tensors_trained_beside_the_model_are_checkpointed(tmp_path):
    def learner():
        torch.manual_seed(0)
        return LearnedRate(ml.models.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01)

    def adam(lrn):
        return torch.optim.Adam([*lrn.model.parameters(), lrn.log_rate], lr=0.05)

    straight = learner()
    run(straight, None, 6, optimizer=adam(straight))
    first = learner()
    run(first, tmp_path / "a.pt", 3, optimizer=adam(first))
    second = learner()
    run(second, tmp_path / "a.pt", 6, optimizer=adam(second))
    assert straight.log_rate.item() != 0.0
    assert torch.equal(second.log_rate, straight.log_rate)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_saving_never_takes_a_users_file_for_its_temporary(tmp_path):
    ckpt = tmp_path / "b.pt"
    mine = tmp_path / "b.pt.tmp"
    mine.write_text("my notes")
    run(maml(), ckpt, 2)
    assert mine.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt", "b.pt.tmp"]


def test_zoo_save_writes_both_files_or_neither(tmp_path):
    net = ml.models.MLP(1, (4,), 1)
    ml.zoo.save("x", net, {"note": "first"}, directory=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError):  # a record JSON cannot hold
        ml.zoo.save("x", net, {"bad": object()}, directory=tmp_path, overwrite=True)
    with pytest.raises(TypeError):
        ml.zoo.save("y", net, {"bad": object()}, directory=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    ml.zoo.save("y", net, {"note": "y"}, directory=tmp_path)  # y is free
    assert json.loads((tmp_path / "y.json").read_text()) == {"note": "y"}


def test_reproduction_keeps_other_methods_results(tmp_path):
    for method in ("pretrained", "maml"):
        reproduce.sinusoid(
            methods=(method,),
            iterations=3,
            out=tmp_path,
            progress=False,
            eval_tasks=10,
            device="cpu",
        )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"pretrained", "maml"}


def test_learning_curves_label_the_window_they_use():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ml.plots.learning_curves({"short": [1.0] * 50}, window=100, ax=ax)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [50]
    assert "moving average of 50" in ax.get_ylabel()
    plt.close(fig)


def test_a_model_with_dropout_trains_each_task_with_its_own_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    learner = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    b = sine_batch()
    same = ml.TaskBatch(
        *(
            t[:1].expand(3, *t.shape[1:])
            for t in (b.x_support, b.y_support, b.x_query, b.y_query)
        )
    )
    losses = learner.meta_loss(same, reduce=False)  # one task three times
    assert losses.unique().numel() == 3  # three different masks
    net.eval()  # no dropout: the same task gives the same loss
    assert learner.meta_loss(same, reduce=False).unique().numel() == 1


def test_the_command_line_names_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    from mlbook.__main__ import main

    args = ["sinusoid", "--methods", "pretrained", "--out", str(tmp_path)]
    assert main([*args, "--iterations", "4", "--eval-tasks", "10"]) == 0
    with pytest.raises(SystemExit) as stop:
        main([*args, "--iterations", "2", "--eval-tasks", "10"])
    assert stop.value.code == 2
    assert "past the 2 asked for" in capsys.readouterr().err


def test_resuming_on_other_images_is_refused(tmp_path):
    # FewShot is no dataclass: its fingerprint (a hash of the images) is what
    # the checkpoint compares, so other classes or rotations do not resume
    from mlbook.fewshot import FewShot

    images = torch.rand(6, 4, 1, 28, 28)  # [classes, per_class, C, H, W]
    model = ml.models.Conv4(num_classes=3, hidden=4)
    learner = ml.MAML(model, F.cross_entropy, inner_lr=0.1)
    args = dict(num_tasks=2, k_support=1, k_query=1, device="cpu", progress=False)
    ckpt = tmp_path / "fs.pt"
    ml.meta_train(learner, FewShot(images, 3), 2, checkpoint=ckpt, **args)
    saved = ckpt.read_bytes()
    for other in (FewShot(images.flip(-1), 3), FewShot(images[:5], 3)):
        with pytest.raises(ValueError, match="tasks_data"):
            ml.meta_train(learner, other, 4, checkpoint=ckpt, **args)
    assert ckpt.read_bytes() == saved
    same = FewShot(images.clone(), 3)  # equal images: resumes
    assert ml.meta_train(learner, same, 3, checkpoint=ckpt, **args).resumed_from == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval-tasks", "0"], "--eval-tasks must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--methods", ","], "names no method"),
        (["--device", "bogus"], "--device 'bogus'"),
    ],
)
def test_the_command_line_checks_its_arguments_before_training(
    tmp_path, capsys, args, message
):
    from mlbook.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["sinusoid", "--iterations", "3", "--out", str(tmp_path), *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_a_failing_method_keeps_the_results_of_those_before_it(tmp_path):
    (tmp_path / "reptile.pt").write_bytes(b"not a checkpoint")  # makes reptile fail
    with pytest.raises(ValueError, match="reptile.pt"):
        reproduce.sinusoid(
            ["fomaml", "reptile"], 2, tmp_path, progress=False, eval_tasks=2
        )
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["fomaml"] and results["fomaml"]["iterations"] == 2
