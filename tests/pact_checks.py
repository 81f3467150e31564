"""Shared helpers of the PACT-ResNet tests: a tiny float64 network, fixed noise, gradient checks."""

import numpy as np

from refimpl.gradcheck import check_directional, check_gradients
from refimpl.pact_resnet import PACTResNet


def tiny_net(latents, mode="relaxed", group_size=None, seed=0, halting_bias=0.0, tau=0.1, n=2):
    """A float64 PACT-ResNet (widths 4/6/8) and a (3, 2, 8, 8) input: stage maps 8×8, 4×4, 2×2."""
    rng = np.random.default_rng(seed)
    net = PACTResNet(n, 3, 2, rng, widths=(4, 6, 8), tau=tau, halting_bias=halting_bias, dtype=np.float64,
                     latents=latents, mode=mode, group_size=group_size)
    x = rng.standard_normal((3, 2, 8, 8))
    return rng, net, x


def fixed_noise(net, seed=5):
    """The same relaxed / Bernoulli noise at every evaluation."""
    for block in net.stages:
        block.rng = np.random.default_rng(seed)


def network_gradient_errors(rng, net, x, head_filter):
    """Relative errors of the network's backward: every parameter along one random direction, and
    the halting-head parameters selected by ``head_filter(name)`` coordinate by coordinate.

    The checked function is the logits and the ponder term ``extra_loss()`` together, so the
    gradient of τ·E_q[n] is checked with the rest.
    """

    def forward(**_):  # x and the parameters are changed in place by the checks
        fixed_noise(net)
        logits = net(x)
        return np.concatenate([logits.ravel(), [net.extra_loss()]])

    def backward(upstream):
        net.zero_grad()
        tau = net.tau
        net.tau = tau * upstream[-1]  # the ponder term's upstream weight enters through τ
        dx = net.backward(upstream[:-1].reshape(x.shape[0], -1))
        net.tau = tau
        return {"x": dx, **{name: g.copy() for name, _, g in net.named_parameters()}}

    params = {name: p for name, p, _ in net.named_parameters()}
    directional = check_directional(forward, backward, {"x": x, **params}, rng)
    heads = {name: p for name, p in params.items() if ".heads." in name and head_filter(name)}
    per_coordinate = check_gradients(forward, backward, heads, rng) if heads else {}
    return directional, per_coordinate
