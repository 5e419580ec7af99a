"""A grouped convolution whose second derivative stays batched.

mlbook runs Conv4 on T tasks at once with the tasks' channels side by side and
one convolution with ``groups=T`` per layer (``mlbook.inner``). Second-order
MAML differentiates the support gradient once more. Autograd's double backward
of a grouped convolution (``_convolution_double_backward``, torch 2.11 and
2.13) computes one of its terms, the weight gradient that flows back through
the input gradient, one group at a time: T small convolutions per layer whose
input needs a gradient (3 layers x 32 tasks = 96 of them per 5-way step).

``grouped_conv2d`` has the same forward and first derivative::

    out[n, t]     = sum_c w_t[:, c] * h[n, t, c]               (* = 2-d conv)
    dL/dh[n, t]   = conv_transpose(dL/dout[n, t], w_t)
    dL/dw_t       = sum_n dL/dout[n, t] (x) h[n, t]  (autograd's weight gradient)

but computes the two gradients as two separate differentiable operations: a
transposed convolution, whose derivative is an ordinary grouped convolution
backward (no loop), and ``convolution_backward`` asked for the weight alone,
whose double backward then receives no gradient for an input gradient it
never returned, so the looping term is never run. Measured on an H200 (the
whole meta-step in a CUDA graph, ``mlbook/records/bench-h200-conv4.json``):
12.7 -> 8.75 ms for 5-way 1-shot (32 tasks), 53 -> 40 ms for 20-way 1-shot
with five inner steps, same peak memory.

``shared_conv2d`` is the same convolution when every task's filters are one
tensor, as at the first inner step (all tasks start from theta)::

    out[n, t]     = theta * h[n, t]           one dense conv of N*T examples
    dL/dh[n, t]   = conv_transpose(dL/dout[n, t], theta)        dense as well
    dL/dw_t       = sum_n dL/dout[n, t] (x) h[n, t]    per task, still grouped

so two of the three convolutions, and the terms of the second derivative
that come from them, run as ordinary convolutions (an experiment, off by
default until a GPU has timed it: ``InnerLoop._shared_first_step``).
"""

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


class _GroupedConv2d(torch.autograd.Function):
    # forward and setup_context apart: the form torch.func transforms accept
    @staticmethod
    def forward(h, w, stride, padding, dilation, groups):
        return F.conv2d(h, w, None, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(h, w)
        ctx.conf = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        # No @once_differentiable: under create_graph autograd records these
        # operations, so this backward is itself differentiated (second order).
        h, w = ctx.saved_tensors
        conf = ctx.conf  # stride, padding, dilation, groups
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = _input_grad(grad_out, w, h.shape, *conf)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad_out, h, w, *conf)
        return grad_h, grad_w, None, None, None, None


def _input_grad(grad_out, w, h_shape, stride, padding, dilation, groups):
    """dL/dh[n, t] = conv_transpose(dL/dout[n, t], w_t), whose derivative is an
    ordinary (grouped) convolution backward, no loop."""
    # output_padding: the rows/columns a strided convolution skipped
    extra = [
        h_shape[2 + d]
        - (
            (grad_out.shape[2 + d] - 1) * stride[d]
            - 2 * padding[d]
            + dilation[d] * (w.shape[2 + d] - 1)
            + 1
        )
        for d in range(2)
    ]
    return F.conv_transpose2d(
        grad_out, w, None, stride, padding, extra, groups, dilation
    )


def _weight_grad(grad_out, h, w, stride, padding, dilation, groups):
    """dL/dw_t = sum_n dL/dout[n, t] (x) h[n, t], autograd's own weight
    gradient: differentiated again it is handed no gradient of an input
    gradient, so its double backward skips the per-group loop."""
    return torch.ops.aten.convolution_backward(
        grad_out,
        h,
        w,
        None,
        stride,
        padding,
        dilation,
        False,
        (0, 0),
        groups,
        (False, True, False),
    )[1]


def grouped_conv2d(h, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(h, w, bias, stride, padding, dilation, groups)`` with a
    backward whose own derivative has no per-group loop (see the module), as
    ``book/09_tools`` describes."""
    if isinstance(padding, str):
        raise ValueError("grouped_conv2d takes numeric padding, not 'same'/'valid'")
    if torch.compiler.is_compiling():
        # Traced by torch.compile under torch.func's grad of grad, a Function
        # whose backward convolves gets wrong second derivatives (torch 2.13,
        # off by 1e5 in tests/test_grouped_conv.py; even a backward that is
        # autograd's own convolution_backward). F.conv2d is right there.
        return F.conv2d(h, w, bias, stride, padding, dilation, groups)
    out = _GroupedConv2d.apply(
        h, w, _pair(stride), _pair(padding), _pair(dilation), groups
    )
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


class _SharedConv2d(torch.autograd.Function):
    # h [N, T*C, H, W] (task t's channels t*C .. t*C+C-1), w [T, C_out, C, k, k]
    # with every task's filters the same tensor (an expand of theta)
    @staticmethod
    def forward(h, w, stride, padding, dilation):
        n, t = h.shape[0], w.shape[0]
        # [N, T*C, H, W] and [N*T, C, H, W] are the same memory (NCHW): one
        # dense convolution of N*T examples with the one filter bank
        dense = h.view(n * t, -1, *h.shape[2:])
        out = F.conv2d(dense, w[0], None, stride, padding, dilation)
        return out.view(n, -1, *out.shape[2:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, stride, padding, dilation = inputs
        ctx.save_for_backward(h, w)
        ctx.conf = (stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        # Differentiable, as _GroupedConv2d's (second order).
        h, w = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        n, t = h.shape[0], w.shape[0]
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            # dL/dh[n, t] = conv_transpose(dL/dout[n, t], theta): dense too.
            # Differentiated, its weight gradient lands on w[0] alone, which
            # is right for the sum over tasks that flows back into theta
            # (what the expand's backward computes), not slot by slot.
            dense = grad_out.reshape(n * t, -1, *grad_out.shape[2:])
            grad_h = _input_grad(dense, w[0], h.shape, stride, padding, dilation, 1)
            grad_h = grad_h.view(h.shape)
        if ctx.needs_input_grad[1]:
            # dL/dw_t: each task's own, so still grouped (its data differ).
            # The weight only gives the shape here, and has no derivative in
            # this output: a detached copy keeps it out of the graph.
            grouped = w.detach().reshape(-1, *w.shape[2:])
            grad_w = _weight_grad(grad_out, h, grouped, stride, padding, dilation, t)
            grad_w = grad_w.view(w.shape)
        return grad_h, grad_w, None, None, None


def shared_conv2d(h, w, bias=None, stride=1, padding=0, dilation=1):
    """``grouped_conv2d(h, w.flatten(0, 1), bias.flatten(), ..., groups=T)``
    for per-task filters ``w [T, C_out, C, k, k]`` that are all the same, as
    at the first inner step, where every task starts from theta.

    The forward and the input gradient are dense convolutions over the
    ``N*T`` examples, which cuDNN runs with its ordinary kernels rather than
    grouped ones; each task's weight gradient stays a grouped one. Only for
    weights whose derivatives end up summed over the tasks, as an expand's
    backward does: differentiated twice, the input gradient's derivative
    with respect to the filters is put on ``w[0]`` alone (see ``backward``).
    ``h`` must be NCHW-contiguous ``[N, T*C, H, W]``. An untimed experiment
    beside the grouped convolution of ``book/09_tools``."""
    if isinstance(padding, str):
        raise ValueError("shared_conv2d takes numeric padding, not 'same'/'valid'")
    if w.dim() != 5 or h.dim() != 4 or h.shape[1] != w.shape[0] * w.shape[2]:
        raise ValueError(
            f"shared_conv2d takes h [N, T*C, H, W] and w [T, C_out, C, k, k], "
            f"got {tuple(h.shape)} and {tuple(w.shape)}"
        )
    if not h.is_contiguous():
        raise ValueError("shared_conv2d needs h NCHW-contiguous (N*T examples)")
    out = _SharedConv2d.apply(h, w, _pair(stride), _pair(padding), _pair(dilation))
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)
