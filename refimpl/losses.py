r"""Softmax cross-entropy, computed stably.

For logits ``z`` (N, M) and integer labels ``y`` (N,),

.. math::

    L = \frac1N \sum_n \Big(\log \sum_m e^{z_{nm}} - z_{n y_n}\Big), \qquad
    \frac{\partial L}{\partial z_{nm}} = \frac1N\big(\text{softmax}(z_n)_m - [m = y_n]\big).

The log-sum-exp subtracts the row maximum first, so no exponential overflows: large logits give
the right loss instead of ``inf - inf = nan``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (N, M) softmax
    labels: np.ndarray  # (N,)
    per_example: np.ndarray  # (N,) the loss of each example (its mean is the loss)


def log_softmax(logits):
    """``z - logsumexp(z)`` row by row, computed from ``z - max(z)``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def check_labels(labels, n, num_classes):
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an int array of shape ({n},), got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got values in [{labels.min()}, {labels.max()}]")
    return labels


def softmax_cross_entropy_forward(logits, labels):
    """Mean cross-entropy of ``logits`` (N, M) against ``labels`` (N,). Returns ``(loss, cache)``."""
    if not isinstance(logits, np.ndarray) or logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D array (N, M), got {getattr(logits, 'shape', type(logits))}")
    labels = check_labels(labels, logits.shape[0], logits.shape[1])
    logp = log_softmax(logits)
    per_example = -logp[np.arange(logits.shape[0]), labels]
    return float(per_example.mean()), CrossEntropyCache(np.exp(logp), labels, per_example)


def softmax_cross_entropy_backward(dloss, cache):
    """``dlogits = dloss · (softmax − onehot) / N``."""
    n = cache.labels.shape[0]
    dlogits = cache.probs.copy()
    dlogits[np.arange(n), cache.labels] -= 1.0
    return dlogits * (dloss / n)
