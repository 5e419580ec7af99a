"""meta_train (seeding, checkpoints, resume), evaluate (intervals), the zoo and
the reproduction command."""

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mlbook as ml


def fresh(method="maml"):
    torch.manual_seed(0)
    net = ml.models.MLP(1, (16, 16), 1)
    if method == "maml-dropout":
        # dropout masks come from torch's global generator, which the
        # checkpoint must carry over for a resume to draw the same masks
        net = torch.nn.Sequential(
            torch.nn.Linear(1, 16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(16, 1),
        )
        return ml.MAML(net, F.mse_loss, inner_lr=0.01)
    if method == "reptile":
        return ml.Reptile(net, F.mse_loss, inner_lr=0.02, inner_steps=2, outer_lr=0.1)
    # compiled: meta-gradient and Adam in one call, Adam's state in the optimizer
    compile = method == "maml-compiled"
    return ml.MAML(net, F.mse_loss, inner_lr=0.01, inner_steps=1, compile=compile)


@pytest.mark.parametrize("method", ["maml", "reptile", "maml-compiled", "maml-dropout"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, method):
    dist = ml.tasks.Sinusoid()
    straight = fresh(method)
    full = ml.meta_train(
        straight, dist, 40, num_tasks=4, seed=3, device="cpu", progress=False
    )
    ckpt = tmp_path / "run.pt"
    first = fresh(method)
    ml.meta_train(
        first,
        dist,
        25,
        num_tasks=4,
        seed=3,
        device="cpu",
        checkpoint=ckpt,
        checkpoint_every=10,
        progress=False,
    )
    second = fresh(method)  # a new process would start from a fresh model too
    resumed = ml.meta_train(
        second,
        dist,
        40,
        num_tasks=4,
        seed=3,
        device="cpu",
        checkpoint=ckpt,
        checkpoint_every=10,
        progress=False,
    )
    assert resumed.resumed_from == 25
    assert resumed.losses == full.losses
    for a, b in zip(
        straight.model.state_dict().values(), second.model.state_dict().values()
    ):
        assert torch.equal(a, b)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 40


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    ckpt = tmp_path / "run.pt"

    def train(iterations, **kwargs):
        args = dict(num_tasks=2, device="cpu", checkpoint=ckpt, progress=False)
        return ml.meta_train(fresh(), ml.tasks.Sinusoid(), iterations, **args | kwargs)

    train(3)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        train(5, resume=False)
    with pytest.raises(ValueError, match="made with"):
        train(5, num_tasks=3)
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(iterations=-1), "iterations"),
        (dict(num_tasks=0), "num_tasks"),
        (dict(k_support=0), "k_support"),
        (dict(outer_lr=0.0), "outer_lr"),
        (dict(checkpoint_every=0), "checkpoint_every"),
    ],
)
def test_meta_train_rejects_bad_arguments(kwargs, match):
    args = dict(iterations=2, progress=False, device="cpu") | kwargs
    with pytest.raises(ValueError, match=match):
        ml.meta_train(fresh(), ml.tasks.Sinusoid(), **args)


def test_meta_train_moves_the_model_to_the_device(device):
    learner = fresh()
    ml.meta_train(
        learner, ml.tasks.Sinusoid(), 2, num_tasks=2, device=device, progress=False
    )
    assert next(learner.model.parameters()).device.type == device.type


def test_evaluate_reports_mean_and_95_interval_over_fixed_tasks():
    learner = fresh()
    dist = ml.tasks.Sinusoid()
    ev = ml.evaluate(
        learner,
        dist,
        steps=(0, 2),
        num_tasks=50,
        k_support=5,
        k_query=7,
        seed=11,
        chunk=20,
    )
    # recompute by hand on the same tasks (same generator, same chunks)
    g = torch.Generator().manual_seed(11)
    batches = [dist.sample(n, 5, 7, generator=g) for n in (20, 20, 10)]
    values = []
    for b in batches:
        with torch.no_grad():
            fast = learner.adapt(b.x_support, b.y_support, steps=2)
            values.append(
                ((learner.predict(fast, b.x_query) - b.y_query) ** 2).mean((1, 2))
            )
    v = torch.cat(values)
    mean, ci = ev.at(2)
    assert math.isclose(mean, v.mean().item(), rel_tol=1e-5)
    assert math.isclose(ci, 1.96 * v.std().item() / math.sqrt(50), rel_tol=1e-4)
    assert ev.values.shape == (2, 50)
    again = ml.evaluate(
        learner,
        dist,
        steps=(0, 2),
        num_tasks=50,
        k_support=5,
        k_query=7,
        seed=11,
        chunk=20,
    )
    assert torch.equal(ev.values, again.values)


def test_evaluate_accuracy_metric_and_errors():
    net = torch.nn.Linear(2, 3)
    maml = ml.MAML(net, F.cross_entropy, inner_lr=0.1)
    x = torch.randn(4, 6, 2)
    y = torch.randint(0, 3, (4, 6))
    ev = ml.evaluate(maml, ml.TaskBatch(x, y, x, y), steps=(0,), metric="accuracy")
    expected = (net(x).argmax(-1) == y).float().mean(-1)
    torch.testing.assert_close(ev.values[0], expected)
    with pytest.raises(ValueError, match="metric"):
        ml.evaluate(maml, ml.TaskBatch(x, y, x, y), metric="f1")
    with pytest.raises(ValueError, match="steps"):
        ml.evaluate(maml, ml.TaskBatch(x, y, x, y), steps=(-1,))


def test_evaluate_counts_diverged_tasks_only_when_asked():
    net = ml.models.MLP(1, (8,), 1)
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    dist = ml.tasks.Sinusoid()
    batch = dist.sample(6, 5, 5, generator=torch.Generator().manual_seed(0))
    batch.x_support[2] = float("nan")  # one poisoned task
    with pytest.raises(FloatingPointError, match="allow_diverged"):
        ml.evaluate(maml, batch, steps=(0, 1))
    ev = ml.evaluate(maml, batch, steps=(0, 1), allow_diverged=True)
    assert ev.diverged == [0, 1]
    clean = ml.evaluate(maml, batch.task(0), steps=(1,)).values
    assert torch.isfinite(ev.values[1, [0, 1, 3, 4, 5]]).all()
    assert math.isclose(ev.mean[1], ev.values[1, [0, 1, 3, 4, 5]].mean().item())
    assert clean.shape == (1, 1)


def test_agrees_with_compares_each_recorded_step():
    inf = float("inf")
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 1.5, inf]])
    ev = ml.EvalResult([0, 10], "loss", values)
    record = ev.as_dict()
    assert [ok for _, _, ok in ev.agrees_with(record)] == [True, True]
    assert ev.agrees_with(record)[1][:2] == (pytest.approx(2.5 / 3), 1)
    # the tolerance: 2% of the record's mean m plus half its interval h, so
    # a mean 2.5 here agrees with m = 2.5 + x up to x = (0.05 + h) / 0.98
    room = (0.02 * 2.5 + 0.5 * record["ci95"][0]) / 0.98
    for shift, ok in [(0.99 * room, True), (1.01 * room, False)]:
        moved = dict(record, mean=[2.5 + shift, record["mean"][1]])
        assert ev.agrees_with(moved)[0][2] is ok
    # one task more or less diverged: the means cannot be compared
    assert ev.agrees_with(dict(record, diverged=[1, 0], mean=[9.0, 9.0])) == [
        (2.5, 0, True),
        (pytest.approx(2.5 / 3), 1, True),
    ]
    assert not ev.agrees_with(dict(record, diverged=[2, 1]))[0][2]
    # only the record's steps are compared
    late = dict(record, steps=[10], mean=[2.5 / 3], ci95=record["ci95"][1:])
    assert len(ev.agrees_with(dict(late, diverged=[1]))) == 1
    with pytest.raises(ValueError, match="accuracy"):
        ev.agrees_with(dict(record, metric="accuracy"))
    with pytest.raises(ValueError, match="600 tasks"):
        ev.agrees_with(dict(record, tasks=600))
    with pytest.raises(ValueError, match=r"steps \[1\]"):
        ev.agrees_with(dict(record, steps=[0, 1]))


def test_zoo_round_trip_and_no_silent_overwrite(tmp_path):
    net = ml.models.MLP(1, (4,), 1)
    record = {
        "model": {"kind": "MLP", "in_features": 1, "hidden": [4], "out_features": 1},
        "command": "test",
    }
    ml.zoo.save("tiny", net, record, directory=tmp_path)
    with pytest.raises(FileExistsError):
        ml.zoo.save("tiny", net, record, directory=tmp_path)
    state = torch.load(tmp_path / "tiny.pt", weights_only=True)
    loaded = ml.models.MLP(1, (4,), 1)
    loaded.load_state_dict(state)
    for a, b in zip(net.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "tiny.json").read_text())["command"] == "test"


# (the Omniglot checkpoints are checked in test_omniglot.py)
@pytest.mark.parametrize(
    "name", [n for n in ml.zoo.available() if n.startswith("sinusoid-")]
)
def test_shipped_sinusoid_checkpoints_load_and_match_their_records(name):
    model, record = ml.zoo.load(name)
    assert "python -m mlbook sinusoid" in record["command"]
    from mlbook.reproduce import EVAL, TEST_LR, sinusoid_learner

    learner = sinusoid_learner(record["results"]["method"], model)
    learner.inner_lr = TEST_LR
    # The record's own protocol: 600 fixed tasks, so the numbers must agree
    # up to float rounding.
    ev = ml.evaluate(learner, ml.tasks.Sinusoid(), **EVAL, allow_diverged=True)
    full = record["results"]["eval"]
    assert full["tasks"] == 600
    assert ev.diverged == full["diverged"]
    for got, want in zip(ev.mean, full["mean"]):
        assert math.isclose(got, want, rel_tol=1e-3), (got, want)


def test_reproduction_command_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlbook",
            "sinusoid",
            "--iterations",
            "20",
            "--methods",
            "maml,pretrained",
            "--out",
            str(tmp_path),
            "--eval-tasks",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "maml" in out.stdout and "pretrained" in out.stdout and "+-" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["maml"]["eval"]["tasks"] == 50
    bad = subprocess.run(
        [sys.executable, "-m", "mlbook", "sinusoid", "--methods", "xyz"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "unknown method" in bad.stderr


def test_readme_thirty_second_snippet_runs_as_written(tmp_path, monkeypatch):
    # The README's first code block, run with 3 meta-iterations for its 5,000:
    # where CUDA is present it runs there (it broke on CUDA once, when the
    # batch stayed on the CPU and meta_train moved the model).
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## The package in thirty seconds", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count("iterations=5_000") == 1
    code = code.replace("iterations=5_000", "iterations=3")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "runs" / "maml.pt").is_file()
    assert ns["run"].iterations == 3
    assert ns["y_hat"].shape == ns["batch"].y_query[0].shape
    # adaptation returned new tensors and left the network as training left it
    for name, p in ns["net"].named_parameters():
        assert not torch.equal(ns["fast"][name], p), name


@pytest.mark.parametrize(
    "method, label",
    [("maml", "MAML:"), ("fomaml", "first-order MAML:"), ("reptile", "Reptile:")],
)
def test_progress_bar_names_the_method(method, label, capsys):
    torch.manual_seed(0)
    net = ml.models.MLP(1, (8,), 1)
    learner = (
        ml.Reptile(net, F.mse_loss, inner_lr=0.02, inner_steps=1)
        if method == "reptile"
        else ml.MAML(net, F.mse_loss, 0.01, first_order=method == "fomaml")
    )
    ml.meta_train(learner, ml.tasks.Sinusoid(), 1, num_tasks=2, device="cpu")
    assert capsys.readouterr().err.lstrip("\r").startswith(label)
