r"""Optimisers and learning-rate schedules.

An optimiser holds the list of ``(name, param, grad)`` triples of a model
(:meth:`refimpl.layers.Layer.named_parameters`) and updates each ``param`` in place from its
``grad`` when :meth:`Optimizer.step` is called.

* **SGD with momentum** (PyTorch's form) and weight decay :math:`\lambda`:

  .. math:: g \leftarrow \nabla + \lambda\theta, \quad v \leftarrow \mu v + g, \quad
            \theta \leftarrow \theta - \eta\, v \;(\text{Nesterov: } \theta \leftarrow \theta - \eta (g + \mu v)).

* **Adam** (Kingma & Ba, 2015) with bias correction:

  .. math:: m \leftarrow \beta_1 m + (1-\beta_1) g, \quad s \leftarrow \beta_2 s + (1-\beta_2) g^2, \quad
            \theta \leftarrow \theta - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{s / (1-\beta_2^t)} + \epsilon}.

Weight decay applies only to arrays with more than one dimension (convolution and linear
weights), not to biases or batch-norm scales and shifts (project choice, common practice).

Schedules map the step number to a learning rate: :class:`StepSchedule` (multiply by ``gamma`` at
each milestone) and :class:`CosineSchedule` (half a cosine from the base rate down to ``final``,
after an optional linear warm-up).
"""

from __future__ import annotations

import math

import numpy as np


class Optimizer:
    """Base: keeps the parameters, a per-parameter state dict and the current learning rate."""

    def __init__(self, parameters, lr, weight_decay=0.0):
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("the optimiser got no parameters")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.steps = 0
        self.state = {name: {} for name, _, _ in self.parameters}

    def _gradient(self, param, grad):
        if self.weight_decay and param.ndim > 1:
            return grad + self.weight_decay * param
        return grad

    def step(self):
        self.steps += 1
        for name, param, grad in self.parameters:
            self.update(param, self._gradient(param, grad), self.state[name])

    def update(self, param, grad, state):
        raise NotImplementedError

    def state_arrays(self):
        """Flat dict ``"name/slot" -> array`` of the optimiser state (for checkpoints)."""
        out = {f"{name}/{slot}": value for name, slots in self.state.items() for slot, value in slots.items()}
        out["@steps"] = np.array(self.steps)
        return out

    def load_state_arrays(self, arrays):
        """Inverse of :meth:`state_arrays`."""
        for key, value in arrays.items():
            if key == "@steps":
                self.steps = int(value)
                continue
            name, slot = key.rsplit("/", 1)
            if name not in self.state:
                raise ValueError(f"optimiser state for unknown parameter {name!r}")
            self.state[name][slot] = np.array(value)


class SGD(Optimizer):
    """Stochastic gradient descent with (Nesterov) momentum and weight decay."""

    def __init__(self, parameters, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
        super().__init__(parameters, lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def update(self, param, grad, state):
        if self.momentum == 0.0:
            param -= self.lr * grad
            return
        v = state.get("velocity")
        if v is None:
            v = state["velocity"] = grad.copy()
        else:
            v *= self.momentum
            v += grad
        param -= self.lr * (grad + self.momentum * v if self.nesterov else v)


class Adam(Optimizer):
    """Adam with bias correction (and L2 weight decay added to the gradient)."""

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(parameters, lr, weight_decay)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.eps = float(eps)

    def update(self, param, grad, state):
        if "m" not in state:
            state["m"], state["s"] = np.zeros_like(param), np.zeros_like(param)
        m, s = state["m"], state["s"]
        m *= self.beta1
        m += (1 - self.beta1) * grad
        s *= self.beta2
        s += (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1 ** self.steps)
        s_hat = s / (1 - self.beta2 ** self.steps)
        param -= (self.lr * m_hat / (np.sqrt(s_hat) + self.eps)).astype(param.dtype, copy=False)


class ConstantSchedule:
    def __init__(self, base_lr):
        self.base_lr = float(base_lr)

    def __call__(self, step):
        return self.base_lr


class StepSchedule:
    """``base_lr · gamma^(number of milestones ≤ step)``."""

    def __init__(self, base_lr, milestones, gamma=0.1):
        self.base_lr, self.gamma = float(base_lr), float(gamma)
        self.milestones = sorted(int(m) for m in milestones)

    def __call__(self, step):
        return self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)


class CosineSchedule:
    """Linear warm-up for ``warmup`` steps, then ``final + (base - final)(1 + cos(π t)) / 2``, t from 0 to 1."""

    def __init__(self, base_lr, total_steps, final_lr=0.0, warmup=0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.base_lr, self.final_lr = float(base_lr), float(final_lr)
        self.total_steps, self.warmup = int(total_steps), int(warmup)

    def __call__(self, step):
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.final_lr + (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * t)) / 2
