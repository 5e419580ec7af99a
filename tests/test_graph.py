"""CUDA-graph meta-steps (mlbook.graph): the same updates as eager steps.

The checks that replay graphs need a GPU and are skipped without one; the
bad-input checks run everywhere.
"""

import pytest
import torch
import torch.nn.functional as F

import mlbook as ml
from mlbook.graph import GraphedStep
from mlbook.omniglot_repro import AnnealedReptile

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def episodes(tasks, way, shot, query, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, way * shot, 1, 28, 28, generator=g)
    xq = torch.rand(tasks, way * query, 1, 28, 28, generator=g)
    ys = torch.arange(way).repeat_interleave(shot).expand(tasks, -1).contiguous()
    yq = torch.arange(way).repeat_interleave(query).expand(tasks, -1).contiguous()
    return ml.TaskBatch(xs, ys, xq, yq)


class Episodes:
    """A tiny task source with ``sample`` for meta_train (random images)."""

    def sample(self, num_tasks, k_support, k_query, generator=None, device=None):
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        return episodes(num_tasks, 5, k_support, k_query, seed).to(device)


def test_cuda_graph_needs_a_cuda_device_and_a_capturable_optimizer():
    net = ml.models.MLP(1, (8,), 1)
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="capturable=True"):
            ml.meta_train(maml, ml.tasks.Sinusoid(), 2, device="cuda",
                          optimizer=torch.optim.Adam(net.parameters()),
                          cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ml.meta_train(
            maml, ml.tasks.Sinusoid(), 2, device="cpu", cuda_graph=True, progress=False
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_graphed_step_without_cuda_is_a_clear_error():
    maml = ml.MAML(ml.models.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01)
    batch = ml.tasks.Sinusoid().sample(2, 5, 5)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        GraphedStep(maml, None, batch)


@cuda
@pytest.mark.parametrize("model", ["mlp", "conv4"])
def test_graphed_training_equals_eager_training(model):
    def run(graph):
        torch.manual_seed(0)
        if model == "mlp":
            net, loss, lr, tasks, kw = (
                ml.models.MLP(1, (40, 40), 1),
                F.mse_loss,
                0.01,
                ml.tasks.Sinusoid(),
                {},
            )
        else:
            net, loss, lr, tasks, kw = (
                ml.models.Conv4(1, 5),
                F.cross_entropy,
                0.4,
                Episodes(),
                dict(k_support=1, k_query=2),
            )
        maml = ml.MAML(net, loss, inner_lr=lr)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True)
        res = ml.meta_train(
            maml,
            tasks,
            20,
            num_tasks=8,
            optimizer=opt,
            device="cuda",
            progress=False,
            cuda_graph=graph,
            **kw,
        )
        return res.losses, [p.detach().clone() for p in net.parameters()]

    (eager_losses, eager), (graph_losses, graphed) = run(False), run(True)
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-6)
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda
def test_capture_leaves_model_and_optimizer_as_they_were():
    torch.manual_seed(0)
    net = ml.models.Conv4(1, 5, hidden=16).cuda()
    maml = ml.MAML(net, F.cross_entropy, inner_lr=0.4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step = GraphedStep(maml, opt, episodes(4, 5, 1, 2, 0).to("cuda"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for state in opt.state.values():  # as fresh as an unused Adam's
        assert all(float(v.abs().sum()) == 0 for v in state.values())
    assert maml.check_finite  # switched off only while capturing
    loss = step(episodes(4, 5, 1, 2, 1).to("cuda"))
    assert torch.isfinite(loss)
    assert not torch.equal(net.head.weight, before["head.weight"])


class _SyncsWhenCaptured(ml.MAML):
    """A step that reads a value on the host: fine eagerly, fatal in capture."""

    def step(self, batch, optimizer):
        loss = super().step(batch, optimizer)
        if torch.cuda.is_current_stream_capturing():
            loss.item()
        return loss


@cuda
def test_the_graph_keeps_alive_what_it_writes_into():
    # A caller may keep only the GraphedStep; the optimizer's state (which
    # each replay updates in place) must not be freed under it. Without the
    # reference a second graph's capture (empty_cache) unmapped that memory
    # and the first graph's replay hit an illegal address.
    import gc
    import weakref

    def graphed():
        net = ml.models.Conv4(1, 5, hidden=8).cuda()
        maml = ml.MAML(net, F.cross_entropy, inner_lr=0.4)
        opt = torch.optim.Adam(net.parameters(), 1e-3, capturable=True)
        step = GraphedStep(maml, opt, episodes(4, 5, 1, 2, 0).to("cuda"))
        return step, weakref.ref(opt), weakref.ref(maml)

    first, opt, learner = graphed()
    gc.collect()
    assert opt() is not None and learner() is not None
    second, _, _ = graphed()  # a second capture in the same process
    batch = episodes(4, 5, 1, 2, 1).to("cuda")
    for _ in range(3):
        loss_a, loss_b = first(batch), second(batch)
    torch.cuda.synchronize()
    assert torch.isfinite(loss_a) and torch.isfinite(loss_b)


@cuda
def test_a_failed_capture_leaves_model_and_optimizer_as_they_were():
    torch.manual_seed(0)
    net = ml.models.Conv4(1, 5, hidden=16).cuda()
    maml = _SyncsWhenCaptured(net, F.cross_entropy, inner_lr=0.4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError):
        GraphedStep(maml, opt, episodes(4, 5, 1, 2, 0).to("cuda"))
    for k, v in net.state_dict().items():  # the warm-up steps are undone
        assert torch.equal(v, before[k]), k


@cuda
def test_annealed_reptile_replays_the_changing_step_size():
    def run(graph):
        torch.manual_seed(0)
        net = ml.models.Conv4(1, 5, hidden=16)
        rep = ml.Reptile(
            net, F.cross_entropy, inner_lr=0.1, inner_steps=3, outer_lr=1.0
        )
        trainer = AnnealedReptile(rep, 1.0, 0.0, 6)
        ml.meta_train(
            trainer,
            Episodes(),
            6,
            num_tasks=3,
            k_support=2,
            k_query=0,
            device="cuda",
            progress=False,
            cuda_graph=graph,
        )
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda
def test_graphed_step_refuses_bad_input_before_running():
    net = ml.models.MLP(1, (8,), 1).cuda()
    maml = ml.MAML(net, F.mse_loss, inner_lr=0.01)
    batch = ml.tasks.Sinusoid().sample(4, 5, 5).to("cuda")
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(maml, torch.optim.Adam(net.parameters()), batch)
    with pytest.raises(ValueError, match="not on"):
        GraphedStep(maml, None, ml.tasks.Sinusoid().sample(4, 5, 5))
    step = GraphedStep(maml, torch.optim.Adam(net.parameters(), capturable=True), batch)
    with pytest.raises(ValueError, match="captured for"):
        step(ml.tasks.Sinusoid().sample(5, 5, 5).to("cuda"))
