"""A grouped convolution whose second derivative stays batched.

mlbook runs Conv4 on T tasks at once with the tasks' channels side by side and
one convolution with ``groups=T`` per layer (``mlbook.inner``). Second-order
MAML differentiates the support gradient once more, and autograd's double
backward of a grouped convolution (torch 2.13, ``_convolution_double_backward``)
computes one of its terms one group at a time: T small convolutions per layer
where the input needs a gradient. On an H200 that loop was about a third of a
5-way MAML step (3 layers x 32 tasks = 96 extra convolutions per step).

``grouped_conv2d`` gives the same forward and first derivative, with a backward
written in operations whose own derivatives are batched over the groups:

    out[n, t, o]       = sum_c  w_t[o, c] * h[n, t, c]          (* = 2-d conv)
    dL/dh[n, t, c]     = sum_o  w_t[o, c] (*T) dL/dout[n, t, o]  (transposed conv)
    dL/dw_t[o, (c,i,j)] = sum_n sum_l dL/dout[n, t, o, l] * patch(h)[n, t, (c,i,j), l]

The last line is one batched matmul over the unfolded patches of h (l runs
over output positions). Differentiating these again gives a grouped
convolution's plain backward (batched natively), a batched matmul's backward
and a fold: no loop over tasks.
"""

import torch
import torch.nn.functional as F


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _GroupedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, stride, padding, dilation, groups):
        ctx.save_for_backward(h, w)
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(h, w, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        # No @once_differentiable: under create_graph autograd records these
        # operations, so this backward is itself differentiated (second order).
        h, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            # output_padding: the rows/columns a strided convolution skipped
            extra = [
                h.shape[2 + d]
                - ((grad_out.shape[2 + d] - 1) * stride[d] - 2 * padding[d]
                   + dilation[d] * (w.shape[2 + d] - 1) + 1)
                for d in range(2)
            ]
            grad_h = F.conv_transpose2d(
                grad_out, w, None, stride, padding, extra, groups, dilation
            )
        if ctx.needs_input_grad[1]:
            # autograd's own weight gradient: differentiated again it needs no
            # gradient of grad_h, so the double backward skips its loop
            grad_w = torch.ops.aten.convolution_backward(
                grad_out, h, w, None, stride, padding, dilation, False, (0, 0),
                groups, (False, True, False),
            )[1]
        return grad_h, grad_w, None, None, None, None


def grouped_conv2d(h, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(h, w, bias, stride, padding, dilation, groups)`` with a
    backward whose own derivative has no per-group loop (see the module)."""
    if isinstance(padding, str):
        raise ValueError("grouped_conv2d takes numeric padding, not 'same'/'valid'")
    out = _GroupedConv2d.apply(
        h, w, _pair(stride), _pair(padding), _pair(dilation), groups
    )
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)
