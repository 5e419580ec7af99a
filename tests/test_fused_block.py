"""mlbook.fused_block: batch norm -> ReLU -> 2x2 max-pool with hand-written
derivatives, checked against finite differences and against autograd through
F.batch_norm, torch.relu and F.max_pool2d, in float64."""

import pytest
import torch
import torch.nn.functional as F

from mlbook import fused_block
from mlbook.fused_block import bn_relu_pool
from mlbook.inner import _conv_plan, _fusable
from mlbook.models import Conv4

SIZES = [(3, 4, 6, 6), (2, 3, 7, 5)]  # an odd side: the pool drops its last row


def _inputs(device, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g, dtype=torch.float64)
    gamma = torch.randn(shape[1], generator=g, dtype=torch.float64)
    beta = torch.randn(shape[1], generator=g, dtype=torch.float64)
    return [t.to(device).requires_grad_() for t in (h, gamma, beta)]


def _reference(h, gamma, beta, eps=1e-5):
    z = F.batch_norm(h, None, None, gamma, beta, training=True, eps=eps)
    return F.max_pool2d(torch.relu(z), 2)


def _derivatives(fn, h, gamma, beta):
    """Output, first derivatives of a loss whose upstream gradient depends on
    the output (so the second derivative sees it), and second derivatives."""
    g = torch.Generator().manual_seed(1)
    y = fn(h, gamma, beta)
    v = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    u = torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)
    first = torch.autograd.grad(
        (y.square() * v).sum(), (h, gamma, beta), create_graph=True
    )
    s = (first[0] * u).sum() + first[1].square().sum() + first[2].pow(3).sum()
    second = torch.autograd.grad(s, (h, gamma, beta), allow_unused=True)
    # d(dL/dbeta)/dbeta is zero and autograd's graph may not reach it
    second = [
        torch.zeros_like(p) if d is None else d
        for d, p in zip(second, (h, gamma, beta))
    ]
    return [y, *first, *second]


@pytest.mark.parametrize("shape", SIZES)
def test_eager_formulas_match_finite_differences(shape):
    h, gamma, beta = _inputs("cpu", shape)

    def block(h, gamma, beta):
        return bn_relu_pool(h, gamma, beta, compiled=False)

    torch.testing.assert_close(block(h, gamma, beta), _reference(h, gamma, beta))
    assert torch.autograd.gradcheck(block, (h, gamma, beta))
    assert torch.autograd.gradgradcheck(block, (h, gamma, beta))


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_second_derivatives_equal_autograds(device, compiled, one_pass):
    h, gamma, beta = _inputs(device, SIZES[1])
    got = _derivatives(
        lambda h, g, b: bn_relu_pool(h, g, b, compiled=compiled, one_pass=one_pass),
        h,
        gamma,
        beta,
    )
    if compiled and fused_block.compile_error is not None:
        pytest.skip(f"torch.compile fails here: {fused_block.compile_error}")
    expected = _derivatives(_reference, h, gamma, beta)
    for name, a, e in zip(
        ["y", "dh", "dgamma", "dbeta", "d2h", "d2gamma", "d2beta"], got, expected
    ):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=name)


def test_bad_shapes_are_refused_before_compute():
    h, gamma, beta = _inputs("cpu", SIZES[0])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        bn_relu_pool(h.flatten(2), gamma, beta)
    with pytest.raises(ValueError, match="gamma and beta"):
        bn_relu_pool(h, gamma[:2], beta)


def test_backward_allocates_no_gradient_for_the_indices():
    # The pool's indices are an output without a gradient; autograd would
    # otherwise fill a zero tensor of their size (int64) at every backward.
    from torch.profiler import ProfilerActivity, profile

    h, gamma, beta = _inputs("cpu", SIZES[0])
    y = bn_relu_pool(h, gamma, beta, compiled=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.sum().backward()
    names = [e.key for e in prof.key_averages()]
    assert "aten::zeros_like" in names  # the formulas' own (ReLU's mask)
    assert "aten::zeros" not in names


def test_only_the_exact_block_is_fused():
    plan = _conv_plan(Conv4(1, 5, hidden=4))
    norms = [i for i, step in enumerate(plan) if step[0] == "norm"]
    assert norms and all(_fusable(plan, i) for i in norms)
    # a 3x3 pool, or a norm without affine weights, runs op by op
    plan = _conv_plan(Conv4(1, 5, hidden=4))
    plan[3][2].kernel_size = 3
    assert not _fusable(plan, 1)
    plan = _conv_plan(Conv4(1, 5, hidden=4))
    plan[1][2].affine = False
    assert not _fusable(plan, 1)


def test_a_failed_compile_warns_and_runs_the_same_formulas(monkeypatch):
    def no_compiler(fn):
        def fail(*args):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(fused_block, "_COMPILED", {})
    monkeypatch.setattr(fused_block, "compile_error", None)
    monkeypatch.setattr(torch, "compile", no_compiler)
    h, gamma, beta = _inputs("cpu", SIZES[0])
    # an input the formulas themselves refuse is the input's fault: it raises,
    # and compile stays on
    with pytest.raises(RuntimeError):
        bn_relu_pool(h.detach().long(), gamma, beta)
    assert fused_block.compile_error is None
    with pytest.warns(UserWarning, match="no C.. compiler"):
        y = bn_relu_pool(h, gamma, beta)
    torch.testing.assert_close(y, _reference(h, gamma, beta))
    assert "no C++ compiler" in fused_block.compile_error


def test_inside_torch_compile_it_is_the_plain_composition(needs_compile):
    # grad of a function taking grads, compiled whole: there bn_relu_pool is
    # F.batch_norm -> ReLU -> max-pool, which the outer compile fuses itself
    from torch.func import grad

    h, gamma, beta = (t.detach() for t in _inputs("cpu", SIZES[0]))

    def meta_grad(gamma, beta, block):
        def loss(gamma, beta):
            return block(h, gamma, beta).square().sum()

        def adapted_loss(gamma, beta):
            g1, g2 = grad(loss, argnums=(0, 1))(gamma, beta)
            return loss(gamma - 0.1 * g1, beta - 0.1 * g2)

        return grad(adapted_loss, argnums=(0, 1))(gamma, beta)

    expected = meta_grad(gamma, beta, _reference)
    got = torch.compile(lambda a, b: meta_grad(a, b, bn_relu_pool))(gamma, beta)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_torch_func_transforms_take_it():
    # grad of grad through the Function itself (eager), as in the test above
    from torch.func import grad

    h, gamma, beta = (t.detach() for t in _inputs("cpu", SIZES[1]))

    def meta_grad(block):
        def loss(beta):
            return block(h, gamma, beta).square().sum()

        return grad(lambda b: loss(b - 0.1 * grad(loss)(b)))(beta)

    block = lambda h, g, b: bn_relu_pool(h, g, b, compiled=False)  # noqa: E731
    torch.testing.assert_close(meta_grad(block), meta_grad(_reference))


def test_by_default_only_cuda_passes_differentiated_twice_are_fused(monkeypatch):
    # MAML's support pass (differentiated twice) takes the fused block on
    # CUDA; the query pass, first-order passes and every CPU pass do not.
    # The rule is read off the activations' device, so a spy on the block
    # and a stand-in for that device check it without a GPU.
    import torch.nn.functional as F

    import mlbook as ml
    from mlbook import inner

    calls = []

    def spy(h, gamma, beta, eps=1e-5, compiled=True, one_pass=False):
        calls.append(tuple(h.shape))
        return _reference(h, gamma, beta, eps)

    monkeypatch.setattr(inner, "bn_relu_pool", spy)
    net = Conv4(1, 5, hidden=4)
    batch = ml.TaskBatch(
        torch.randn(2, 5, 1, 28, 28),
        torch.arange(5).expand(2, -1),
        torch.randn(2, 10, 1, 28, 28),
        torch.arange(5).repeat(2).expand(2, -1),
    )
    for first_order, fused_passes in [(False, 1), (True, 0)]:
        maml = ml.MAML(net, F.cross_entropy, 0.4, first_order=first_order)
        maml._task_by_task = False  # all tasks in one pass, as on CUDA
        calls.clear()
        maml.meta_loss(batch)
        assert calls == []  # on the CPU: never
        maml._fused_block = "twice"  # what None means on CUDA
        maml.meta_loss(batch)
        # four blocks per fused pass, each on the support set's 5 images
        assert len(calls) == 4 * fused_passes
        assert all(shape[0] == 5 for shape in calls)


def test_the_cuda_default_falls_back_to_batch_norm_when_compile_failed(
    monkeypatch,
):
    # the rule reads only the activations' device: a stand-in says "CUDA"
    from types import SimpleNamespace

    import torch.nn.functional as F

    import mlbook as ml

    maml = ml.MAML(Conv4(1, 5, hidden=4), F.cross_entropy, 0.4)
    on_gpu = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(fused_block, "compile_error", None)
    assert maml._fuses(on_gpu, twice=True)
    assert not maml._fuses(on_gpu, twice=False)
    assert not maml._fuses(SimpleNamespace(is_cuda=False), twice=True)
    monkeypatch.setattr(fused_block, "compile_error", "RuntimeError: no Triton")
    assert not maml._fuses(on_gpu, twice=True)  # cuDNN's batch norm again
    maml._fused_block = True  # forced: the eager formulas, as asked
    assert maml._fuses(on_gpu, twice=False)
