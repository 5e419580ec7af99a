"""Batch norm -> ReLU -> 2x2 max-pool as one operation, compiled.

For second-order MAML on the GPU: ``mlbook`` takes it on CUDA in the passes
differentiated twice (MAML's support set; ``InnerLoop.__init__`` says why
there only, ``records/bench-h200-fused-block.json`` times it, and ``python -m
mlbook bench --experiments`` times it alone). The H200 profile of a 5-way
Conv4 step (``mlbook/records/bench-h200-profile-grouped-conv.json``), before
it, spent most of its kernel time outside the convolutions: autograd's double
backward of batch norm alone runs about 100 small element-wise and reduction
operations per layer (40 multiplications and 33 sums among them, counted with
torch.profiler on the CPU, torch 2.13), then come ReLU's and max-pool's
backward and their derivatives. Each reads and writes whole activations.
Here the three layers are one ``autograd.Function`` whose forward and backward
are each one function compiled by ``torch.compile``; autograd differentiates
the backward (second order) through the compiled function's own backward, so
the double backward is fused code too.

Per channel, over the ``m = N * H * W`` values of the batch::

    mu = mean(h),  var = mean((h - mu)^2),  xhat = (h - mu) / sqrt(var + eps)
    z  = gamma * xhat + beta,  a = max(z, 0),  y = maxpool2x2(a)

and, given ``gy = dL/dy``::

    ga        = gy routed to each window's maximum (the forward's indices)
    gz        = ga * [z > 0]
    dL/dbeta  = sum gz,   dL/dgamma = sum gz * xhat
    dL/dh     = gamma / sqrt(var + eps)
                * (gz - dL/dbeta / m - xhat * dL/dgamma / m)

The same function and derivatives as ``F.batch_norm`` (training statistics, no
running ones), ``torch.relu`` and ``F.max_pool2d(a, 2)``, to float64 rounding:
``tests/test_fused_block.py``.
"""

import warnings

import torch
import torch.nn.functional as F

_POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)  # kernel, stride, pad, dil, ceil


def _normalize(h, gamma, beta, eps, one_pass=False):
    # mu, var, xhat, z of the module docstring, per channel over (N, H, W)
    if one_pass:
        # both statistics in one read of h (compiled: a Welford reduction);
        # mlbook's inner loop passes it (inner.py, _one_pass_stats): the H200
        # profile put the two-pass form's reduction at 45 us per call on a
        # 32 MB activation, several times its bytes
        var, mean = torch.var_mean(h, (0, 2, 3), correction=0, keepdim=True)
    else:
        mean = h.mean((0, 2, 3), keepdim=True)
        var = (h - mean).square().mean((0, 2, 3), keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (h - mean) * rstd
    return xhat, rstd, xhat * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def _forward(h, gamma, beta, eps, one_pass=False):
    # y = maxpool2x2(max(z, 0)), and where each window's maximum was
    _, _, z = _normalize(h, gamma, beta, eps, one_pass)
    return torch.ops.aten.max_pool2d_with_indices(torch.relu(z), *_POOL[:4])


def _backward(gy, indices, h, gamma, beta, eps, one_pass=False):
    # Recomputes xhat and z from h rather than saving them: fused, that is one
    # more read of h, and it keeps the statistics functions of h, as the
    # second derivative needs them to be.
    xhat, rstd, z = _normalize(h, gamma, beta, eps, one_pass)
    a = torch.relu(z)
    ga = torch.ops.aten.max_pool2d_with_indices_backward(gy, a, *_POOL, indices)
    gz = torch.where(z > 0, ga, torch.zeros_like(ga))  # ReLU'(0) = 0, as torch
    g_beta = gz.sum((0, 2, 3))
    g_gamma = (gz * xhat).sum((0, 2, 3))
    m = h.shape[0] * h.shape[2] * h.shape[3]
    g_h = (gamma.view(1, -1, 1, 1) * rstd) * (
        gz - g_beta.view(1, -1, 1, 1) / m - xhat * (g_gamma.view(1, -1, 1, 1) / m)
    )
    return g_h, g_gamma, g_beta


_COMPILED = {}
compile_error = None  # why torch.compile failed here, if it did (then: eager)


def _fn(name, compiled):
    fn = {"forward": _forward, "backward": _backward}[name]
    if not compiled or compile_error is not None:
        return fn
    if name not in _COMPILED:  # torch.compile imports dynamo: only when asked
        _COMPILED[name] = compiled_or_eager(torch.compile(fn), fn)
    return _COMPILED[name]


def compiled_or_eager(compiled_fn, fn):
    """``compiled_fn`` (``torch.compile(fn)``) with more compiled versions
    allowed, and ``fn`` itself, with one warning, once compiling has failed.

    Also for ``InnerLoop``'s compiled passes. Conv4 calls each function at
    several shapes (4 layers, support, query and evaluation sets; sizes of 1
    are specialized) with and without autograd recording: more than dynamo's
    default of 8 compiled versions per function, past which it silently runs
    the eager code. The limit is raised for these calls only; a step that
    revisits a shape reuses its compiled version.
    """
    import torch._dynamo

    # the setting's name before torch 2.7 (later releases keep it as an alias)
    old_name = not hasattr(torch._dynamo.config, "recompile_limit")
    limit = {"cache_size_limit" if old_name else "recompile_limit": 64}

    def call(*args):
        global compile_error
        if compile_error is not None:  # failed once here: do not retry
            return fn(*args)
        try:
            with torch._dynamo.config.patch(**limit):
                return compiled_fn(*args)
        except Exception as err:  # noqa: BLE001 - no C++ compiler, say
            # eager first: an error of the inputs' own raises again here and
            # leaves compile on; one that was compile's switches it off
            out = fn(*args)
            compile_error = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"torch.compile failed ({compile_error}); mlbook runs its "
                "compiled code eagerly where asked (same numbers, slower), and "
                "the defaults go back to plain batch norm and uncompiled passes",
                stacklevel=2,
            )
            return out

    return call


class _BnReluPool(torch.autograd.Function):
    # forward and setup_context apart: the form torch.func transforms accept
    @staticmethod
    def forward(h, gamma, beta, eps, compiled, one_pass):
        return _fn("forward", compiled)(h, gamma, beta, eps, one_pass)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, gamma, beta, eps, compiled, one_pass = inputs
        indices = output[1]
        ctx.save_for_backward(indices, h, gamma, beta)
        ctx.conf = (eps, compiled, one_pass)
        ctx.mark_non_differentiable(indices)
        # The indices never get a gradient: without this autograd would fill
        # a zero tensor of their size (int64, the pooled output's shape) at
        # every backward, only for it to be ignored
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, _):
        # No @once_differentiable: under create_graph autograd records the
        # compiled backward, whose own backward gives the second derivative.
        if grad_out is None:  # (not materialized) the output was not used
            return None, None, None, None, None, None
        indices, h, gamma, beta = ctx.saved_tensors
        eps, compiled, one_pass = ctx.conf
        backward = _fn("backward", compiled)
        grads = backward(grad_out, indices, h, gamma, beta, eps, one_pass)
        return (*grads, None, None, None)


def bn_relu_pool(h, gamma, beta, eps=1e-5, compiled=True, one_pass=False):
    """``F.max_pool2d(torch.relu(F.batch_norm(h, None, None, gamma, beta,
    training=True, eps=eps)), 2)`` for ``h: [N, C, H, W]``, with a fused
    forward, backward and double backward (see the module).
    ``compiled=False`` runs the same formulas eagerly; ``one_pass=True``
    takes the batch statistics with ``torch.var_mean`` (one read of ``h``)
    instead of the mean and then the variance, as mlbook's inner loop calls
    it (the default here stays the textbook two-pass form). The fused block of
    ``book/09_tools``."""
    if h.dim() != 4:
        raise ValueError(f"h must be [N, C, H, W], got shape {tuple(h.shape)}")
    if gamma.shape != (h.shape[1],) or beta.shape != (h.shape[1],):
        raise ValueError(
            f"gamma and beta must have shape ({h.shape[1]},), got "
            f"{tuple(gamma.shape)} and {tuple(beta.shape)}"
        )
    if torch.compiler.is_compiling():
        # Inside a region torch.compile traces, the plain composition: that
        # compile fuses it anyway, and tracing custom Functions under
        # torch.func's grad of grad is where compile has gone wrong
        # (mlbook.grouped_conv)
        z = F.batch_norm(h, None, None, gamma, beta, training=True, eps=eps)
        return F.max_pool2d(torch.relu(z), 2)
    args = float(eps), bool(compiled), bool(one_pass)
    return _BnReluPool.apply(h, gamma, beta, *args)[0]
