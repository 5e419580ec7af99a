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
        stride, padding, dilation, groups = ctx.conf
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            # dL/dh[n, t] = conv_transpose(dL/dout[n, t], w_t); output_padding:
            # the rows/columns a strided convolution skipped
            extra = [
                h.shape[2 + d]
                - (
                    (grad_out.shape[2 + d] - 1) * stride[d]
                    - 2 * padding[d]
                    + dilation[d] * (w.shape[2 + d] - 1)
                    + 1
                )
                for d in range(2)
            ]
            grad_h = F.conv_transpose2d(
                grad_out, w, None, stride, padding, extra, groups, dilation
            )
        if ctx.needs_input_grad[1]:
            # dL/dw_t = sum_n dL/dout[n, t] (x) h[n, t], autograd's own weight
            # gradient: differentiated again it is handed no gradient of an
            # input gradient, so its double backward skips the loop
            grad_w = torch.ops.aten.convolution_backward(
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
        return grad_h, grad_w, None, None, None, None


def grouped_conv2d(h, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(h, w, bias, stride, padding, dilation, groups)`` with a
    backward whose own derivative has no per-group loop (see the module)."""
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
