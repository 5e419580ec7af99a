"""The MAML meta-gradient and the Reptile step of a ReLU MLP with MSE loss,
written out by hand.

For tiny models on a CPU, a meta-step costs what autograd costs: building a
graph node per operation, then walking it twice (the double backward of
second-order MAML). For the MAML paper's sinusoid regressor (Linear and ReLU
layers, mean squared error, one inner SGD step) the whole meta-gradient has a
short closed form in batched matrix products, computed here with no autograd
at all. ``MAML.step`` uses it when the learner matches exactly that case on
the CPU, and ``Reptile.step`` uses the same forward and backward passes for
its inner SGD steps (any number of them); ``tests/test_mlp_grad.py`` checks
both against autograd in float64.

Notation, per task t (batched over the leading task dim): layers l = 1..L with
weights W_l [out, in] and biases b_l; a_0 = x; z_l = a_{l-1} W_l^T + b_l;
a_l = relu(z_l) for l < L; the output is o = z_L; m_l = [z_l > 0].

Support loss and its gradient (n_s = K * out entries per task):

    L_s = mean (o - y)^2,   delta_L = 2 (o - y) / n_s,
    dL_s/dW_l = delta_l^T a_{l-1},  dL_s/db_l = sum_k delta_l,
    delta_{l-1} = (delta_l W_l) * m_{l-1}

One inner step: W'_l = W_l - alpha dL_s/dW_l (per task), the same for b.
The query loss at W' backpropagates the same way to v = dL_q/dW' (one v per
task). The chain rule through the inner step then gives

    dL_q/dtheta = v - alpha H_s v,

where H_s v, the support-loss Hessian times v, is the directional derivative
of the support gradient in direction v (an "R-op", Pearlmutter 1994): run the
support forward and backward passes again, differentiating each line along v
(R{W_l} = v_W_l, R{b_l} = v_b_l, R{m_l} = 0 because relu'' = 0):

    R{z_l} = R{a_{l-1}} W_l^T + a_{l-1} v_W_l^T + v_b_l,   R{a_l} = m_l R{z_l}
    R{delta_L} = 2 R{o} / n_s
    R{dL_s/dW_l} = R{delta_l}^T a_{l-1} + delta_l^T R{a_{l-1}}
    R{dL_s/db_l} = sum over examples of R{delta_l}
    R{delta_{l-1}} = (R{delta_l} W_l + delta_l v_W_l) * m_{l-1}

First-order MAML drops the H_s v term. The meta-gradient of theta (shared by
all tasks) is the mean over tasks of each task's dL_q/dtheta.
"""

from __future__ import annotations

import torch

__all__ = [
    "relu_mlp_meta_grad",
    "adam_update",
    "maml_adam_step",
    "relu_mlp_sgd",
    "reptile_step",
]

# Each product below is one of three shapes. A matrix product whose inner or
# outer size is 1 (the sinusoid's 1 -> 40 and 40 -> 1 layers) is written as a
# broadcast multiply (and a sum): on the CPU a library matrix call costs some
# 20 us whatever its size, while torch.compile fuses the elementwise form into
# its neighbours. Shapes are static, so each branch is fixed at compile time.


def _linear(a, w, b):
    """z = a W^T + b for a [T, K, in]; W [out, in] (shared) or [T, out, in]."""
    out, d_in = w.shape[-2:]
    b = b.unsqueeze(-2)  # [1, out] or [T, 1, out]
    if d_in == 1:
        return a * w.transpose(-1, -2) + b
    if out == 1:
        return (a * w).sum(-1, keepdim=True) + b
    if w.dim() == 2:  # shared theta: one product for all tasks' points
        return torch.addmm(b, a.flatten(0, 1), w.t()).view(*a.shape[:2], out)
    return torch.baddbmm(b, a, w.transpose(1, 2))


def _times_w(d, w):
    """d W for d [T, K, out]; W [out, in] or [T, out, in] (back through W)."""
    out, d_in = w.shape[-2:]
    if out == 1:
        return d * w
    if d_in == 1:
        return (d * w.transpose(-1, -2)).sum(-1, keepdim=True)
    if w.dim() == 2:
        return (d.flatten(0, 1) @ w).view(*d.shape[:2], d_in)
    return torch.bmm(d, w)


def _outer(d, a):
    """Per-task d^T a [T, out, in], for d [T, K, out] and a [T, K, in]."""
    if d.shape[-1] == 1 or a.shape[-1] == 1:
        return (d.unsqueeze(-1) * a.unsqueeze(-2)).sum(1)
    return torch.bmm(d.transpose(1, 2), a)


def _outer_sum(pairs):
    """sum over tasks and pairs of d^T a, for pairs of d [T, K, out], a [T, K, in]:
    one product over all rows (rows of both pairs stacked)."""
    d, a = (torch.cat([p[i].flatten(0, 1) for p in pairs]) for i in (0, 1))
    if d.shape[-1] == 1 or a.shape[-1] == 1:
        return (d.unsqueeze(-1) * a.unsqueeze(-2)).sum(0)
    return d.t() @ a


def _forward(x, weights, biases):
    """Activations a_0..a_{L-1}, masks m_1..m_{L-1} and the output o."""
    acts, masks, a = [x], [], x
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = _linear(a, w, b)
        if i == len(weights) - 1:
            return acts, masks, z
        m = (z > 0).to(z.dtype)
        a = z * m
        acts.append(a)
        masks.append(m)


def _backward(delta, acts, masks, weights):
    """Per-task gradients of one task batch's loss given delta_L, and the
    deltas delta_1..delta_L (kept for the R-op)."""
    n = len(weights)
    g_w, g_b, deltas = [None] * n, [None] * n, [None] * n
    for i in range(n - 1, -1, -1):
        deltas[i] = delta
        g_w[i] = _outer(delta, acts[i])  # delta_l^T a_{l-1}
        g_b[i] = delta.sum(1)
        if i > 0:  # delta_{l-1} = (delta_l W_l) * m_{l-1}
            delta = _times_w(delta, weights[i]) * masks[i - 1]
    return g_w, g_b, deltas


def relu_mlp_meta_grad(weights, biases, x_s, y_s, x_q, y_q, alpha, first_order=False):
    """Mean query loss after one inner SGD step, and its gradient w.r.t. each
    ``weights[l]`` ``[out, in]`` and ``biases[l]`` ``[out]`` (shared theta).

    ``x_s [T, K, in]``, ``y_s [T, K, out]``, ``x_q [T, Q, in]``, ``y_q [T, Q,
    out]``. Returns ``(loss, grad_weights, grad_biases)``; plain tensors, no
    autograd graph. ``book/09_tools`` times it against autograd's.
    """
    num_tasks, n = x_s.shape[0], len(weights)
    # Support pass at theta (the same weights for every task).
    acts, masks, out = _forward(x_s, weights, biases)
    delta_s = (out - y_s) * (2.0 / out[0].numel())
    g_w, g_b, deltas = _backward(delta_s, acts, masks, weights)
    # One inner step: theta'_t = theta - alpha * grad L_s,t(theta)
    fast_w = [w - alpha * g for w, g in zip(weights, g_w)]  # [T, out, in]
    fast_b = [b - alpha * g for b, g in zip(biases, g_b)]  # [T, out]
    # Query pass at theta'_t; v = dL/dtheta'_t of the mean over tasks.
    acts_q, masks_q, out_q = _forward(x_q, fast_w, fast_b)
    diff = out_q - y_q
    loss = diff.square().flatten(1).mean(1).mean()
    delta_q = diff * (2.0 / (out_q[0].numel() * num_tasks))
    v_w, v_b, _ = _backward(delta_q, acts_q, masks_q, fast_w)
    if first_order:
        return loss, [g.sum(0) for g in v_w], [g.sum(0) for g in v_b]
    # H_s v by the R-op: forward along v ...
    r_acts = [None]
    for i in range(n - 1):
        r_z = _linear(acts[i], v_w[i], v_b[i])  # a_{l-1} v_W^T + v_b
        if i > 0:
            r_z = r_z + _times_w(r_acts[i], weights[i].t())  # + R{a_{l-1}} W^T
        r_acts.append(r_z * masks[i])
    r_z = _linear(acts[-1], v_w[-1], v_b[-1])
    if n > 1:
        r_z = r_z + _times_w(r_acts[-1], weights[-1].t())
    # ... and backward along v (r_z is R{o}), summed over tasks as it goes:
    # dL/dtheta = sum_t (v_t - alpha H_s,t v_t)
    r_delta = r_z * (2.0 / out[0].numel())
    grad_w, grad_b = [None] * n, [None] * n
    for i in range(n - 1, -1, -1):
        pairs = [(r_delta, acts[i])] + ([(deltas[i], r_acts[i])] if i > 0 else [])
        grad_w[i] = v_w[i].sum(0) - alpha * _outer_sum(pairs)
        grad_b[i] = v_b[i].sum(0) - alpha * r_delta.sum((0, 1))
        if i > 0:
            r_delta = _times_w(r_delta, weights[i]) + _times_w(deltas[i], v_w[i])
            r_delta = r_delta * masks[i - 1]
    return loss, grad_w, grad_b


# Reptile (mlbook.reptile) on the same MLP needs no second derivative: per task
# t, ``steps`` SGD steps on its support set from the shared theta, each
# gradient from the backward pass above,
#
#     phi_t <- phi_t - alpha * grad L_s,t(phi_t)          (phi_t = theta at first)
#
# then one move of theta towards the tasks' mean:
#
#     theta <- theta - outer_lr * (theta - mean_t phi_t)
def relu_mlp_sgd(weights, biases, x, y, alpha, steps):
    """Each task's ``(weights, biases)`` after ``steps`` SGD steps on its mean
    squared error, ``x [T, K, in]``, ``y [T, K, out]``, from the shared
    ``weights[l] [out, in]`` and ``biases[l] [out]`` (the results are [T, ...]).
    Reptile's inner loop in the closed-form steps of ``book/09_tools``."""
    for _ in range(steps):
        acts, masks, out = _forward(x, weights, biases)
        delta = (out - y) * (2.0 / out[0].numel())
        g_w, g_b, _ = _backward(delta, acts, masks, weights)
        weights = [w - alpha * g for w, g in zip(weights, g_w)]
        biases = [b - alpha * g for b, g in zip(biases, g_b)]
    return weights, biases


def reptile_step(weights, biases, x_s, y_s, x_e, y_e, alpha, steps, outer_lr, guard):
    """One Reptile meta-step of the MLP. Returns each task's loss ``[T]`` at its
    adapted weights on ``x_e``/``y_e`` and the directions ``theta - mean_t
    phi_t`` (``weights`` then ``biases``). With ``outer_lr`` (a 0-dim tensor)
    the update is also applied to ``weights`` and ``biases`` in place; with
    ``guard`` it is skipped unless every task's loss is finite.
    ``book/09_tools`` times it."""
    fast_w, fast_b = relu_mlp_sgd(weights, biases, x_s, y_s, alpha, steps)
    out = _forward(x_e, fast_w, fast_b)[2]
    losses = (out - y_e).square().flatten(1).mean(1)
    theta = weights + biases
    directions = [p - f.mean(0) for p, f in zip(theta, fast_w + fast_b)]
    if outer_lr is not None:
        apply = torch.isfinite(losses).all() if guard else None
        for p, d in zip(theta, directions):
            new = p - outer_lr * d
            p.copy_(new if apply is None else torch.where(apply, new, p))
    return losses, directions


# Adam, as torch.optim.Adam computes it (amsgrad and maximize off), per tensor:
#
#     t <- t + 1;  g <- g + lambda p                      (weight decay lambda)
#     m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
#     p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#
# Written here so that torch.compile fuses the update into the same call as the
# meta-gradient: on the CPU, torch.optim.Adam's own step costs about as much
# as the whole compiled meta-gradient of the sinusoid MLP.
def adam_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, hyper, apply):
    """Adam's step on ``params`` in place, with its state (the tensors
    ``torch.optim.Adam`` keeps: ``exp_avg``, ``exp_avg_sq``, ``step``) updated
    in place too. ``lr`` is a 0-dim tensor (so a schedule does not recompile);
    ``hyper = (beta1, beta2, eps, weight_decay)``; nothing changes unless the
    0-dim bool ``apply`` is true. Part of the compiled MAML step of
    ``book/09_tools``."""
    beta1, beta2, eps, weight_decay = hyper
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t_new = t + 1
        if weight_decay:
            g = g + weight_decay * p
        m_new = m + (1 - beta1) * (g - m)
        v_new = beta2 * v + (1 - beta2) * g * g
        t64 = t_new.to(torch.float64)  # bias corrections in double, as Adam's
        denom = v_new.sqrt() / (1 - beta2**t64).sqrt() + eps
        p_new = p - lr / (1 - beta1**t64) * m_new / denom
        for old, new in ((p, p_new), (m, m_new), (v, v_new), (t, t_new)):
            old.copy_(torch.where(apply, new, old))


def maml_adam_step(
    weights, biases, state, x_s, y_s, x_q, y_q, alpha, first_order, lr, hyper
):
    """One whole MAML meta-step of the MLP: ``relu_mlp_meta_grad``, then
    ``adam_update`` of ``weights + biases`` with ``state = (exp_avgs,
    exp_avg_sqs, steps)`` in the same order, skipped when the loss is not
    finite. Returns what ``relu_mlp_meta_grad`` returns. The compiled MAML step
    of ``book/09_tools``."""
    loss, g_w, g_b = relu_mlp_meta_grad(
        weights, biases, x_s, y_s, x_q, y_q, alpha, first_order
    )
    adam_update(weights + biases, g_w + g_b, *state, lr, hyper, torch.isfinite(loss))
    return loss, g_w, g_b
