r"""The distributions of probabilistic adaptive computation (PACT, docs/spec.md §9).

An adaptive computation block runs iterations ``1..L``; after iteration ``l < L`` it emits a
halting probability :math:`h_l = \sigma(a_l)` (``a_l`` is the halting *logit*), and
:math:`h_L \equiv 1`. Everything in this module is a pure function of arrays whose **last axis
indexes the iterations**; leading axes (batch, positions, ...) are carried along.

* **Halting distribution** (the auxiliary posterior over the number of iterations ``n``)

  .. math:: q(n) = h_n \prod_{l<n} (1 - h_l), \qquad
            \mathbb{E}_q[n] = \sum_{l=1}^{L} \prod_{j<l} (1 - h_j).

  ``q`` is a *stick-breaking* of the unit stick with fractions ``h``: iteration ``n`` takes the
  fraction ``h_n`` of what the earlier iterations left. The relaxed block uses the same
  construction with relaxed samples ``z`` in place of ``h`` (:func:`stick_breaking_forward`).
* **Relaxed Bernoulli** (binary Concrete / Gumbel-Softmax, Maddison et al. 2017, Jang et al. 2017)

  .. math:: z = \sigma\!\left(\frac{\operatorname{logit} h + \log u - \log(1 - u)}{\lambda}\right),
            \qquad u \sim U(0, 1),

  so :math:`P(z > 1/2) = h` for every temperature ``λ`` and ``z → Bernoulli(h)`` as ``λ → 0``.
  The noise ``u`` is an explicit argument, which makes the reparameterised backward
  :math:`\partial z / \partial a = z (1 - z) / \lambda` checkable with fixed noise.
* **Truncated geometric prior** on ``{1..L}``: :math:`p(n) \propto (1 - \varphi)^{n-1}`, so
  :math:`\log p(n) = -\beta n + \text{const}` with :math:`\beta = -\log(1 - \varphi)` — the prior
  that turns into the linear ponder penalty ``τ E_q[n]``.
* **KL(q ‖ prior)** in PonderNet's direction (the halting distribution first).

Every ``*_forward`` returns ``(out, cache)`` and every ``*_backward`` takes ``(dout, cache)``.
Probabilities are taken as logits wherever a logarithm follows, so that saturated halting units
(``h`` rounding to exactly 0 or 1) still give finite values and gradients.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _checks

# --------------------------------------------------------------------------- elementary functions


def sigmoid(x):
    """:math:`\\sigma(x) = 1 / (1 + e^{-x})`, evaluated without overflow for any sign of ``x``."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_sigmoid(x):
    """:math:`\\log \\sigma(x) = -\\log(1 + e^{-x})`, stable for large ``|x|``."""
    x = np.asarray(x)
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def logit(h):
    """:math:`\\log h - \\log(1 - h)` for probabilities strictly inside (0, 1)."""
    h = _probabilities(h, "h", open_interval=True)
    return np.log(h) - np.log1p(-h)


def _probabilities(h, name, open_interval=False):
    h = _checks.float_array(h, name).reshape(np.shape(h))  # keep 0-d inputs 0-d
    bad = (h <= 0) | (h >= 1) if open_interval else (h < 0) | (h > 1)
    if np.any(bad):
        interval = "(0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got values from {h.min()} to {h.max()}")
    return h


def _temperature(value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"temperature must be a positive real number, got {value!r}")
    if not (np.isfinite(float(value)) and float(value) > 0.0):
        raise ValueError(f"temperature must be positive and finite, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- stick-breaking


class StickBreakingCache(NamedTuple):
    fractions: np.ndarray  # (..., L-1) the fractions v_l taken at iterations 1..L-1
    remaining: np.ndarray  # (..., L)   r_l = prod_{j<l} (1 - v_j), r_1 = 1


def stick_breaking_forward(fractions):
    r"""Break the unit stick: :math:`w_l = v_l \prod_{j<l}(1 - v_j)`, :math:`w_L = \prod_{j<L}(1 - v_j)`.

    With ``v = h`` this is the halting distribution ``q(n)``; with relaxed samples ``v = z̃`` it
    gives the weights of the relaxed block's output :math:`\sum_l w_l U_l`. The weights are
    non-negative and sum to one along the last axis.

    Parameters
    ----------
    fractions : ndarray (..., L-1), values in [0, 1]

    Returns
    -------
    weights : ndarray (..., L)
    cache : StickBreakingCache
    """
    v = _probabilities(fractions, "fractions")
    if v.ndim == 0:
        raise ValueError("fractions must have at least one axis (the iterations), got a scalar")
    remaining = np.cumprod(np.concatenate([np.ones(v.shape[:-1] + (1,), v.dtype), 1.0 - v], axis=-1), axis=-1)
    weights = remaining.copy()
    weights[..., :-1] *= v  # w_l = v_l r_l for l < L; w_L = r_L
    return weights, StickBreakingCache(v, remaining)


def stick_breaking_backward(dweights, cache):
    r"""Gradient of the stick-breaking weights w.r.t. the fractions.

    Reverse accumulation through :math:`r_{l+1} = r_l (1 - v_l)` — no division by ``1 - v_l``,
    so fractions equal to one are handled exactly.

    Parameters
    ----------
    dweights : ndarray (..., L)
    cache : StickBreakingCache

    Returns
    -------
    dfractions : ndarray (..., L-1)
    """
    v, r = cache
    dweights = _checks.upstream(dweights, "dweights", r.shape)
    last = v.shape[-1]
    dv = np.empty_like(v)
    dr = dweights[..., last].copy()  # ∂/∂r_L
    for l in range(last - 1, -1, -1):  # iterations L-1 .. 1 (0-based l)
        # w_l = v_l r_l and r_{l+1} = (1 - v_l) r_l both depend on v_l and r_l
        dv[..., l] = dweights[..., l] * r[..., l] - dr * r[..., l]
        dr = dweights[..., l] * v[..., l] + dr * (1.0 - v[..., l])
    return dv


def halting_distribution(h):
    """``q(n) = h_n Π_{l<n}(1 - h_l)`` for ``n = 1..L`` (``h_L ≡ 1``): (..., L-1) → (..., L).

    The stick-breaking of the halting probabilities; its gradient is
    :func:`stick_breaking_backward` with the returned cache.
    """
    return stick_breaking_forward(h)


# --------------------------------------------------------------------------- expected steps


class ExpectedStepsCache(NamedTuple):
    h: np.ndarray  # (..., L-1)
    reach: np.ndarray  # (..., L) probability of reaching iteration l: prod_{j<l} (1 - h_j)


def expected_steps_forward(h):
    r""":math:`\mathbb{E}_q[n] = \sum_{l=1}^{L} \prod_{j<l}(1 - h_j)`: the expected number of iterations.

    Each term is the probability that iteration ``l`` runs at all, which is why the sum is the
    mean of ``q``: :math:`\sum_n n\,q(n) = \sum_l P(n \ge l)`.

    Parameters
    ----------
    h : ndarray (..., L-1), halting probabilities after iterations 1..L-1

    Returns
    -------
    expected : ndarray (...)
    cache : ExpectedStepsCache
    """
    h = _probabilities(h, "h")
    if h.ndim == 0:
        raise ValueError("h must have at least one axis (the iterations), got a scalar")
    reach = np.cumprod(np.concatenate([np.ones(h.shape[:-1] + (1,), h.dtype), 1.0 - h], axis=-1), axis=-1)
    return reach.sum(axis=-1), ExpectedStepsCache(h, reach)


def expected_steps_backward(dexpected, cache):
    r"""Gradient of :math:`\mathbb{E}_q[n]` w.r.t. ``h``: :math:`-\sum_{l>k} \prod_{j<l, j \ne k}(1-h_j)`.

    Computed by reverse accumulation (no division by ``1 - h_k``).

    Parameters
    ----------
    dexpected : ndarray (...)
    cache : ExpectedStepsCache

    Returns
    -------
    dh : ndarray (..., L-1)
    """
    h, reach = cache
    dexpected = np.asarray(_checks.upstream(dexpected, "dexpected", h.shape[:-1]), dtype=h.dtype)
    dh = np.empty_like(h)
    dreach = dexpected.copy()  # ∂/∂reach_L
    for l in range(h.shape[-1] - 1, -1, -1):
        # reach_{l+1} = reach_l (1 - h_l); every reach_l enters the sum with weight one
        dh[..., l] = -dreach * reach[..., l]
        dreach = dexpected + dreach * (1.0 - h[..., l])
    return dh


# --------------------------------------------------------------------------- log q(n) from logits


class LogHaltingCache(NamedTuple):
    logits: np.ndarray  # (..., L-1)


def log_halting_distribution_forward(logits):
    r"""``log q(n)`` for ``n = 1..L`` from halting logits ``a`` (``h = σ(a)``): (..., L-1) → (..., L).

    :math:`\log q(n) = \log\sigma(a_n) + \sum_{l<n} \log\sigma(-a_l)` (the ``n = L`` term has no
    first summand). Exact even where ``σ(a)`` rounds to 0 or 1.
    """
    a = _checks.float_array(logits, "logits").reshape(np.shape(logits))  # keep a scalar 0-d
    if a.ndim == 0:
        raise ValueError("logits must have at least one axis (the iterations), got a scalar")
    log_continue = np.cumsum(log_sigmoid(-a), axis=-1)  # Σ_{l<=k} log(1 - h_l)
    before = np.concatenate([np.zeros(a.shape[:-1] + (1,), a.dtype), log_continue], axis=-1)  # Σ_{l<n}
    log_q = before.copy()
    log_q[..., :-1] += log_sigmoid(a)
    return log_q, LogHaltingCache(a)


def log_halting_distribution_backward(dlog_q, cache):
    r"""Gradient of ``log q(n)`` (all ``n``) w.r.t. the logits.

    :math:`\partial \log q(n) / \partial a_l` is :math:`1 - h_l` for ``l = n``, :math:`-h_l` for
    ``l < n`` and 0 for ``l > n``.

    Parameters
    ----------
    dlog_q : ndarray (..., L)
    cache : LogHaltingCache

    Returns
    -------
    dlogits : ndarray (..., L-1)
    """
    a = cache.logits
    dlog_q = _checks.upstream(dlog_q, "dlog_q", a.shape[:-1] + (a.shape[-1] + 1,))
    h = sigmoid(a)
    later = np.cumsum(dlog_q[..., ::-1], axis=-1)[..., ::-1]  # Σ_{n>=l} dlog_q[n]
    return dlog_q[..., :-1] * (1.0 - h) - later[..., 1:] * h


def log_halting_probability_grad(logits, steps):
    r"""Score function :math:`\nabla_a \log q(n)` of one drawn number of iterations per latent.

    This is what REINFORCE multiplies by the learning signal ``(f - b)``.

    Parameters
    ----------
    logits : ndarray (..., L-1), halting logits
    steps : int ndarray (...), the drawn ``n`` in ``1..L``

    Returns
    -------
    score : ndarray (..., L-1)
    """
    a = _checks.float_array(logits, "logits").reshape(np.shape(logits))
    if a.ndim == 0:
        raise ValueError("logits must have at least one axis (the iterations), got a scalar")
    steps = np.asarray(steps)
    length = a.shape[-1] + 1
    if steps.shape != a.shape[:-1]:
        raise ValueError(f"steps must have shape {a.shape[:-1]}, got {steps.shape}")
    if not np.issubdtype(steps.dtype, np.integer) or np.any((steps < 1) | (steps > length)):
        raise ValueError(f"steps must be integers in [1, {length}], got {steps!r}")
    one_hot = (np.arange(1, length + 1) == steps[..., None]).astype(a.dtype)
    return log_halting_distribution_backward(one_hot, LogHaltingCache(a))


# --------------------------------------------------------------------------- Bernoulli indicators


def uniform_noise(shape, rng, dtype=np.float64):
    """``u ~ U(0, 1)`` strictly inside the interval (so ``log u`` and ``log(1 - u)`` are finite)."""
    rng = _checks.generator(rng)
    return open_unit_interval(rng.random(size=shape), dtype)


def open_unit_interval(u, dtype):
    """Cast ``u`` in [0, 1] to ``dtype`` and clip it into the open interval (0, 1).

    Needed because rounding to float32 maps every double in (1 - 2⁻²⁵, 1) to exactly 1.
    """
    dtype = np.dtype(dtype)
    return np.clip(np.asarray(u).astype(dtype), np.finfo(dtype).tiny, np.nextafter(dtype.type(1), dtype.type(0)))


def bernoulli_from_noise(logits, u):
    r"""Halting indicators :math:`z = [a + \log u - \log(1 - u) > 0]`, i.e. ``z ~ Bernoulli(σ(a))``.

    The λ → 0 limit of :func:`relaxed_bernoulli_forward` with the *same* noise ``u`` (``z = 1``
    exactly when ``u > 1 - h``), so the relaxed and discrete modes can share samples; with
    ``u = 1/2`` it is the thresholded rule ``h > 1/2``.
    """
    a = _checks.float_array(logits, "logits")
    u = _checks.float_array(u, "u")
    if u.shape != a.shape:
        raise ValueError(f"u must have the shape of logits {a.shape}, got {u.shape}")
    if np.any((u <= 0) | (u >= 1)):
        raise ValueError("u must lie strictly inside (0, 1)")
    return a + np.log(u) - np.log1p(-u) > 0


def first_halt(indicators):
    """Number of iterations run: the first ``l`` with ``z_l = 1``, or ``L`` if none: (..., L-1) → (...)."""
    z = np.asarray(indicators, dtype=bool)
    if z.ndim == 0:
        raise ValueError("indicators must have at least one axis (the iterations), got a scalar")
    padded = np.concatenate([z, np.ones(z.shape[:-1] + (1,), bool)], axis=-1)  # z_L ≡ 1
    return np.argmax(padded, axis=-1) + 1


# --------------------------------------------------------------------------- relaxed Bernoulli


class RelaxedBernoulliCache(NamedTuple):
    z: np.ndarray
    temperature: float


def relaxed_bernoulli_forward(logits, temperature, u):
    r"""Binary Concrete sample :math:`z = \sigma((a + \log u - \log(1-u)) / \lambda)`.

    Parameters
    ----------
    logits : ndarray (...), ``a = logit h``
    temperature : float > 0, ``λ``
    u : ndarray (...) in (0, 1), the uniform noise (see :func:`uniform_noise`)

    Returns
    -------
    z : ndarray (...), in (0, 1)
    cache : RelaxedBernoulliCache
    """
    a = _checks.float_array(logits, "logits")
    lam = _temperature(temperature)
    u = _checks.float_array(u, "u")
    if u.shape != a.shape:
        raise ValueError(f"u must have the shape of logits {a.shape}, got {u.shape}")
    if np.any((u <= 0) | (u >= 1)):
        raise ValueError("u must lie strictly inside (0, 1)")
    z = sigmoid((a + np.log(u) - np.log1p(-u)) / lam)
    return z, RelaxedBernoulliCache(z, lam)


def relaxed_bernoulli_backward(dz, cache):
    """Reparameterised gradient w.r.t. the logits, the noise held fixed: ``dz · z (1 - z) / λ``."""
    z, lam = cache
    dz = _checks.upstream(dz, "dz", z.shape)
    return dz * z * (1.0 - z) / lam


def relaxed_bernoulli_cdf(t, h, temperature):
    r"""Closed-form CDF of the binary Concrete: :math:`P(z \le t) = \sigma(\lambda \operatorname{logit} t - \operatorname{logit} h)`.

    Follows from :math:`z \le t \iff g \le \lambda \operatorname{logit} t - a` with logistic noise
    :math:`g = \log u - \log(1-u)`, whose CDF is ``σ``. ``t`` and ``h`` in (0, 1).
    """
    lam = _temperature(temperature)
    return sigmoid(lam * logit(t) - logit(h))


# --------------------------------------------------------------------------- prior and KL


def geometric_beta(phi):
    """``β = -log(1 - φ)``: the linear penalty per iteration equivalent to a geometric prior with rate ``φ``."""
    phi = _geometric_rate(phi)
    return -np.log1p(-phi)


def _geometric_rate(phi):
    if not isinstance(phi, numbers.Real) or isinstance(phi, bool):
        raise TypeError(f"phi must be a real number in (0, 1), got {phi!r}")
    if not 0.0 < float(phi) < 1.0:
        raise ValueError(f"phi must be in (0, 1), got {phi!r}")
    return float(phi)


def truncated_geometric_log_prob(phi, length):
    r"""Log-probabilities of the geometric prior truncated to ``{1..L}``.

    .. math:: \log p(n) = (n - 1)\log(1 - \varphi) + \log\varphi - \log\bigl(1 - (1 - \varphi)^L\bigr)

    Parameters
    ----------
    phi : float in (0, 1), probability of halting at each iteration
    length : int >= 1, ``L``

    Returns
    -------
    log_p : ndarray (L,) float64
    """
    phi = _geometric_rate(phi)
    if not isinstance(length, numbers.Integral) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    n = np.arange(1, length + 1, dtype=np.float64)
    log_norm = np.log(phi) - np.log1p(-((1.0 - phi) ** length))
    return (n - 1) * np.log1p(-phi) + log_norm


class KLCache(NamedTuple):
    q: np.ndarray
    log_ratio: np.ndarray


def _log_distribution(log_p, name):
    """Check log-probabilities along the last axis: no NaN or +inf, and ``exp`` sums to one.

    ``-inf`` is allowed (a probability of exactly zero). The sum may miss one by rounding and by
    the small steps of a central-difference check, not more: ``max(1e-5, 100 · L · eps)``. A
    larger miss is a mistake the KL would silently absorb — logits or ``q`` itself passed where
    ``log q`` belongs — so it is reported.
    """
    log_p = _checks.float_array(log_p, name, allow_nonfinite=True).reshape(np.shape(log_p))
    if log_p.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the iterations), got a scalar")
    bad = np.isnan(log_p) | (log_p == np.inf)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be log-probabilities (finite or -inf), got {log_p[first]} at index {first}")
    total = np.exp(log_p).sum(axis=-1)
    tol = max(1e-5, 100 * log_p.shape[-1] * np.finfo(log_p.dtype).eps)
    off = np.abs(total - 1.0) > tol
    if off.any():
        first = tuple(int(i) for i in np.argwhere(np.atleast_1d(off))[0])
        worst = float(np.atleast_1d(total)[first])
        raise ValueError(f"{name} must be the log of a distribution over the last axis (exp sums to 1 within "
                         f"{tol:.1e}), got a sum of {worst!r} at {first}")
    return log_p


def kl_to_prior_forward(log_q, log_prior):
    r""":math:`\mathrm{KL}(q \,\|\, p) = \sum_n q(n) (\log q(n) - \log p(n))` along the last axis.

    This is PonderNet's regulariser ``KL(p_halt ‖ geometric)``: the *halting distribution first*
    (mode-seeking in the network's distribution; the reverse direction would ask the network to
    cover every step the prior allows).

    Parameters
    ----------
    log_q : ndarray (..., L), log of the halting distribution; ``-inf`` where ``q(n) = 0``
        (such terms contribute :math:`0 \log 0 = 0`). ``exp(log_q)`` must sum to one.
    log_prior : ndarray (L,) or (..., L), log of the prior: finite, ``exp`` sums to one

    Returns
    -------
    kl : ndarray (...)
    cache : KLCache
    """
    log_q = _log_distribution(log_q, "log_q")
    log_prior = _checks.float_array(log_prior, "log_prior").reshape(np.shape(log_prior))
    if log_prior.ndim == 0 or log_q.shape[-1] != log_prior.shape[-1]:
        raise ValueError(f"log_q and log_prior must share the last axis, got {log_q.shape} and {log_prior.shape}")
    log_prior = _log_distribution(log_prior, "log_prior")
    q = np.exp(log_q)
    with np.errstate(invalid="ignore"):
        log_ratio = np.where(q > 0, log_q - log_prior, 0.0)  # q = 0: the term is 0 log 0 = 0
    return np.sum(q * log_ratio, axis=-1), KLCache(q, log_ratio)


def kl_to_prior_backward(dkl, cache):
    """Gradient of the KL w.r.t. ``log q``: ``dkl · q (log q - log p + 1)`` (0 where ``q = 0``)."""
    q, log_ratio = cache
    dkl = _checks.upstream(dkl, "dkl", q.shape[:-1])
    return dkl[..., None] * q * (log_ratio + 1.0)
