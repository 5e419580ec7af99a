"""mlbook.grouped_conv: the grouped convolution whose second derivative is
batched, checked against finite differences and against autograd's own double
backward of F.conv2d, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mlbook.grouped_conv import grouped_conv2d, shared_conv2d

SETTINGS = [(1, 1, 1), (2, 1, 1), (2, 0, 1), (1, 2, 2)]  # stride, padding, dilation


def _inputs(device, groups=3, n=2, c=2, o=3, size=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, groups * c, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(groups * o, c, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(groups * o, generator=g, dtype=torch.float64)
    return [t.to(device).requires_grad_() for t in (h, w, b)]


# size 8 with stride 2: the transposed convolution needs an output_padding
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("stride,padding,dilation", SETTINGS)
def test_values_and_derivatives_match_finite_differences(
    stride, padding, dilation, size
):
    h, w, b = _inputs("cpu", size=size)

    def conv(h, w, b):
        return grouped_conv2d(h, w, b, stride, padding, dilation, groups=3)

    torch.testing.assert_close(
        conv(h, w, b), F.conv2d(h, w, b, stride, padding, dilation, 3)
    )
    assert torch.autograd.gradcheck(conv, (h, w, b))
    assert torch.autograd.gradgradcheck(conv, (h, w, b))


@pytest.mark.parametrize("stride,padding,dilation", SETTINGS)
def test_second_derivative_equals_autograds_double_backward(
    device, stride, padding, dilation
):
    h, w, b = _inputs(device)

    def second(conv):
        out = conv(h, w, b, stride, padding, dilation, 3)
        gh, gw = torch.autograd.grad(out.sin().sum(), (h, w), create_graph=True)
        return torch.autograd.grad(gh.cos().sum() + gw.square().sum(), (h, w))

    for got, want in zip(second(grouped_conv2d), second(F.conv2d)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _convolutions_in_second_backward(conv, groups):
    h, w, b = _inputs("cpu", groups=groups)
    out = conv(h, w, b, 1, 1, 1, groups)
    gh, gw = torch.autograd.grad(out.square().sum(), (h, w), create_graph=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (gh.sum() + gw.sum()).backward()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_second_backward_has_no_loop_over_groups():
    # What the module is for: autograd's double backward runs one convolution
    # per group; this one a fixed number, however many groups (tasks).
    assert _convolutions_in_second_backward(F.conv2d, 8) > 8
    few = _convolutions_in_second_backward(grouped_conv2d, 8)
    assert few == _convolutions_in_second_backward(grouped_conv2d, 2) <= 4


def test_string_padding_is_refused():
    h, w, b = _inputs("cpu")
    with pytest.raises(ValueError, match="numeric padding"):
        grouped_conv2d(h, w, b, padding="same", groups=3)


def test_inside_torch_compile_it_is_plain_conv2d(needs_compile):
    # MAML written with torch.func alone (grad of a function taking grads),
    # compiled whole: traced as a custom Function, the second derivative came
    # out off by ~1e5 (torch 2.13); grouped_conv2d is F.conv2d there.
    from torch.func import grad

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 6, 6, generator=g, dtype=torch.float64)
    w1 = torch.randn(12, 2, 3, 3, generator=g, dtype=torch.float64)
    w2 = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)

    def meta_grad(w1, w2, conv):
        def net(w1, w2):
            h = torch.tanh(conv(x, w1, None, 1, 1, 1, 3))
            return conv(h, w2, None, 1, 1, 1, 3).square().sum()

        def adapted_loss(w1, w2):
            g1, g2 = grad(net, argnums=(0, 1))(w1, w2)
            return net(w1 - 0.1 * g1, w2 - 0.1 * g2)

        return grad(adapted_loss, argnums=(0, 1))(w1, w2)

    expected = meta_grad(w1, w2, F.conv2d)
    got = torch.compile(lambda a, b: meta_grad(a, b, grouped_conv2d))(w1, w2)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("stride,padding,dilation", SETTINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_first_layer_as_a_matmul_is_the_grouped_convolution(
    device, stride, padding, dilation, bias
):
    # InnerLoop's speed experiment for Conv4's first layer (one input channel
    # per task): unfold + one matmul, the bias as a filter tap on a row of
    # ones. Conv4 follows it with batch norm, which cancels a bias, so the MAML
    # tests cannot see a wrong one: it is checked here on its own.
    from torch import nn

    from mlbook.inner import InnerLoop

    tasks, out_ch = 3, 4
    layer = nn.Conv2d(1, out_ch, 3, stride, padding, dilation)
    loop = InnerLoop(nn.Linear(1, 1), F.mse_loss, inner_lr=0.1)
    h, w, b = _inputs(device, groups=tasks, c=1, o=out_ch)
    w = w.detach().view(tasks, out_ch, 1, 3, 3).requires_grad_()
    b = b.detach().view(tasks, out_ch).requires_grad_() if bias else None

    def matmul(h, w, b=None):
        return loop._one_channel_conv(h, w, b, layer, tasks)

    def grouped(h, w, b=None):
        flat_b = None if b is None else b.reshape(-1)
        return F.conv2d(
            h, w.reshape(-1, 1, 3, 3), flat_b, stride, padding, dilation, tasks
        )

    args = (h, w) + ((b,) if bias else ())
    torch.testing.assert_close(matmul(*args), grouped(*args), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(matmul, args)
    assert torch.autograd.gradgradcheck(matmul, args)


def _shared_inputs(device, tasks=3, n=2, c=2, o=3, size=7):
    """h [N, T*C, H, W], and one filter bank and bias (theta) for every task."""
    h, w, b = _inputs(device, groups=1, n=n * tasks, c=c, o=o, size=size)
    return h.detach().view(n, tasks * c, size, size).requires_grad_(), w, b


@pytest.mark.parametrize("stride,padding,dilation", SETTINGS)
def test_shared_filters_match_finite_differences(stride, padding, dilation):
    # theta -> its expand to every task -> shared_conv2d, as the first inner
    # step runs it; derivatives with respect to theta are the tasks' summed
    h, theta, bias = _shared_inputs("cpu")

    def conv(h, theta, bias):
        w, b = theta.expand(3, *theta.shape), bias.expand(3, -1)
        return shared_conv2d(h, w, b, stride, padding, dilation)

    assert torch.autograd.gradcheck(conv, (h, theta, bias))
    assert torch.autograd.gradgradcheck(conv, (h, theta, bias))


@pytest.mark.parametrize("stride,padding,dilation", SETTINGS)
def test_shared_filters_equal_the_grouped_convolution(
    device, stride, padding, dilation
):
    # Against F.conv2d with T copies of the filters and autograd's own double
    # backward: the output, each task's own weight and bias gradient (an
    # inner step's), and second derivatives through those gradients with a
    # different weight per task, as an outer loop's would be.
    tasks = 3
    h, theta, bias = _shared_inputs(device, tasks)
    g = torch.Generator().manual_seed(1)
    per_task = torch.randn(tasks, *theta.shape, generator=g, dtype=torch.float64)
    per_task = per_task.to(device)

    def run(shared):
        w, b = theta.expand(tasks, *theta.shape), bias.expand(tasks, -1)
        if shared:
            out = shared_conv2d(h, w, b, stride, padding, dilation)
        else:
            flat_w, flat_b = w.reshape(-1, *w.shape[2:]), b.reshape(-1)
            out = F.conv2d(h, flat_w, flat_b, stride, padding, dilation, tasks)
        gh, gw, gb = torch.autograd.grad(out.sin().sum(), (h, w, b), create_graph=True)
        outer = gh.cos().sum() + (gw * per_task).sum() + gb.square().sum()
        return (out, gh, gw, gb) + torch.autograd.grad(outer, (h, theta, bias))

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_shared_filters_refuse_what_they_cannot_view():
    h, theta, _ = _shared_inputs("cpu")
    w = theta.expand(3, *theta.shape)
    with pytest.raises(ValueError, match="numeric padding"):
        shared_conv2d(h, w, padding="same")
    with pytest.raises(ValueError, match=r"h \[N, T\*C, H, W\] and w"):
        shared_conv2d(h, w[:2])
    with pytest.raises(ValueError, match="NCHW-contiguous"):
        shared_conv2d(h.contiguous(memory_format=torch.channels_last), w)
