"""The MAML meta-gradient of a ReLU MLP with MSE loss, written out by hand.

For tiny models on a CPU, a meta-step costs what autograd costs: building a
graph node per operation, then walking it twice (the double backward of
second-order MAML). For the MAML paper's sinusoid regressor (Linear and ReLU
layers, mean squared error, one inner SGD step) the whole meta-gradient has a
short closed form in batched matrix products, computed here with no autograd
at all. ``MAML.step`` uses it when the learner matches exactly that case on
the CPU; ``tests/test_mlp_grad.py`` checks it against autograd in float64.

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
    R{delta_{l-1}} = (R{delta_l} W_l + delta_l v_W_l) * m_{l-1}

First-order MAML drops the H_s v term. The meta-gradient of theta (shared by
all tasks) is the mean over tasks of each task's dL_q/dtheta.
"""

from __future__ import annotations

import torch

__all__ = ["relu_mlp_meta_grad"]


def _backward(delta, acts, masks, weights, per_task):
    """Gradients of one task batch's loss, given delta_L: lists of [T, ...]."""
    g_w, g_b = [None] * len(weights), [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        g_w[i] = torch.bmm(delta.transpose(1, 2), acts[i])  # delta_l^T a_{l-1}
        g_b[i] = delta.sum(1)
        if i > 0:
            w = weights[i]  # delta_{l-1} = (delta_l W_l) * m_{l-1}
            delta = (torch.bmm(delta, w) if per_task else delta @ w) * masks[i - 1]
    return g_w, g_b


def _forward(x, weights, biases, per_task):
    """Activations a_0..a_{L-1}, masks m_1..m_{L-1} and the output o."""
    acts, masks, a = [x], [], x
    for i, (w, b) in enumerate(zip(weights, biases)):
        if per_task:  # [T, K, in] x [T, out, in] -> [T, K, out]
            z = torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2))
        else:  # shared theta: one matrix product for all tasks' points
            z = torch.addmm(b, a.flatten(0, 1), w.t()).view(*a.shape[:2], -1)
        if i == len(weights) - 1:
            return acts, masks, z
        m = (z > 0).to(z.dtype)
        a = z * m
        acts.append(a)
        masks.append(m)


def relu_mlp_meta_grad(weights, biases, x_s, y_s, x_q, y_q, alpha, first_order=False):
    """Mean query loss after one inner SGD step, and its gradient w.r.t. each
    ``weights[l]`` ``[out, in]`` and ``biases[l]`` ``[out]`` (shared theta).

    ``x_s [T, K, in]``, ``y_s [T, K, out]``, ``x_q [T, Q, in]``, ``y_q [T, Q,
    out]``. Returns ``(loss, grad_weights, grad_biases)``; plain tensors, no
    autograd graph.
    """
    num_tasks = x_s.shape[0]
    # Support pass at theta (the same weights for every task).
    acts, masks, out = _forward(x_s, weights, biases, per_task=False)
    delta_s = (out - y_s) * (2.0 / out[0].numel())
    g_w, g_b = _backward(delta_s, acts, masks, weights, per_task=False)
    # One inner step: theta'_t = theta - alpha * grad L_s,t(theta)
    fast_w = [w - alpha * g for w, g in zip(weights, g_w)]  # [T, out, in]
    fast_b = [b - alpha * g for b, g in zip(biases, g_b)]  # [T, out]
    # Query pass at theta'_t; v = dL/dtheta'_t of the mean over tasks.
    acts_q, masks_q, out_q = _forward(x_q, fast_w, fast_b, per_task=True)
    diff = out_q - y_q
    loss = diff.square().flatten(1).mean(1).mean()
    delta_q = diff * (2.0 / (out_q[0].numel() * num_tasks))
    v_w, v_b = _backward(delta_q, acts_q, masks_q, fast_w, per_task=True)
    if first_order:
        return loss, [g.sum(0) for g in v_w], [g.sum(0) for g in v_b]
    # H_s v by the R-op: forward along v ...
    r_acts, r_z = [None], None
    for i, (w, vw, vb) in enumerate(zip(weights, v_w, v_b)):
        r_z = torch.baddbmm(vb.unsqueeze(1), acts[i], vw.transpose(1, 2))
        if i > 0:
            r_z = r_z + r_acts[i] @ w.t()
        if i < len(weights) - 1:
            r_acts.append(r_z * masks[i])
    # ... and backward along v (r_z is now R{o}).
    r_delta, delta = r_z * (2.0 / out[0].numel()), delta_s
    grad_w, grad_b = [None] * len(weights), [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        hv_w = torch.bmm(r_delta.transpose(1, 2), acts[i])
        if i > 0:
            hv_w = hv_w + torch.bmm(delta.transpose(1, 2), r_acts[i])
        hv_b = r_delta.sum(1)
        # dL/dtheta = sum_t (v_t - alpha H_s,t v_t)
        grad_w[i] = (v_w[i] - alpha * hv_w).sum(0)
        grad_b[i] = (v_b[i] - alpha * hv_b).sum(0)
        if i > 0:
            mask = masks[i - 1]
            r_delta = (r_delta @ weights[i] + torch.bmm(delta, v_w[i])) * mask
            delta = (delta @ weights[i]) * mask
    return loss, grad_w, grad_b
