"""One parity experiment, as ``ponder parity`` and ``ponder train --task parity`` run it (not a command).

:class:`ParitySettings` holds every setting with its default; :func:`run_parity_experiment` trains
an ACT RNN with :func:`refimpl.parity.train_parity`, prints the training log as it goes, evaluates
fresh examples with every halting rule that fits the objective and returns the results.

The defaults learn parity with every objective in under half a minute on one core (vectors of 8
entries, 5,000 steps at learning rate 3e-3: accuracy 0.999 with ACT, 1.000 with PACT). The
paper's 64 entries need far longer training (ACT with 64 entries and 2,000 steps ends at chance,
0.51), which :func:`known_problems` says before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Below this many training steps per entry of the vector, parity is known not to be learned.
MIN_STEPS_PER_ENTRY = 250


@dataclass
class ParitySettings:
    """Every setting of a parity experiment (the ``ponder parity`` flags, same names)."""

    objective: str
    size: int = 8
    steps: int = 5000
    batch_size: int = 128
    hidden: int = 128
    max_steps: int = 12
    lr: float = 3e-3
    tau: float = 1e-3
    temperature: float = 0.5
    beta: float = 0.01
    prior_rate: float = 0.2
    halting_bias: float = 1.0
    eval_size: int = 2000
    seed: int = 0
    threads: int = 1

    @classmethod
    def field_types(cls):
        """``{name: int | float | str}`` of every setting."""
        return {f.name: {"int": int, "float": float, "str": str}[f.type] for f in dataclasses.fields(cls)}

    @classmethod
    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    def halting_rules(self):
        """The evaluation rules that fit the objective."""
        return ["act"] if self.objective == "act" else ["thresholded", "sample"]


def known_problems(settings):
    """Warnings for settings known not to learn parity (one line each; empty when none is known)."""
    problems = []
    if settings.steps < MIN_STEPS_PER_ENTRY * settings.size:
        problems.append(f"warning: {settings.steps} steps on {settings.size}-entry vectors are likely too few to learn "
                        f"parity (ACT with 64 entries and 2000 steps ends at chance, 0.51); give at least "
                        f"{MIN_STEPS_PER_ENTRY * settings.size} steps (--steps) or fewer entries (--size)")
    if settings.max_steps < 2:
        problems.append(f"warning: --max-steps {settings.max_steps} leaves no room to ponder; parity needs several steps")
    return problems


def run_parity_experiment(settings, out=None, echo=print):
    """Train, evaluate and report one parity experiment.

    Parameters
    ----------
    settings : ParitySettings
    out : str or Path or None — write the results as JSON here
    echo : callable(str) — where the progress and the report go (``print``)

    Returns
    -------
    dict — ``settings``, ``train_seconds``, ``log`` and ``evaluation`` (per rule), as written to ``out``
    """
    from threadpoolctl import threadpool_limits

    from ..parity import evaluate_parity, train_parity

    for line in known_problems(settings):
        echo(line)
    echo(f"parity size {settings.size}, objective {settings.objective}, {settings.steps} steps "
         f"(batch {settings.batch_size}, lr {settings.lr:g})")

    def show(step, rnn, log):
        echo(f"  step {step:6d}  task loss {log.task_loss[-1]:.4f}  ponder {log.ponder[-1]:.2f}")

    rng = np.random.default_rng(settings.seed)
    started = time.perf_counter()
    with threadpool_limits(settings.threads):
        rnn, log = train_parity(
            settings.objective, size=settings.size, steps=settings.steps, batch_size=settings.batch_size,
            hidden_size=settings.hidden, max_steps=settings.max_steps, lr=settings.lr, tau=settings.tau,
            temperature=settings.temperature, beta=settings.beta, prior_rate=settings.prior_rate,
            halting_bias=settings.halting_bias, rng=rng, log_every=max(1, settings.steps // 10), callback=show)
        seconds = time.perf_counter() - started
        reports = {rule: evaluate_parity(rnn, settings.size, rule, settings.eval_size,
                                         np.random.default_rng(settings.seed + 1))
                   for rule in settings.halting_rules()}
    echo(f"trained in {seconds:.1f} s")
    for rule, report in reports.items():
        echo(f"{rule:>12}: accuracy {report.accuracy:.3f}, mean ponder steps {report.mean_steps:.2f}")
        echo("              steps by non-zero entries: "
             + ", ".join(f"{k}:{v:.2f}" for k, v in sorted(report.steps_by_nonzero.items())))
    best = max(report.accuracy for report in reports.values())
    if best < 0.6:
        echo(f"stopped after {settings.steps} steps without learning parity (accuracy {best:.3f}, chance is 0.5)")
    else:
        echo(f"stopped after {settings.steps} steps (the --steps budget); accuracy {best:.3f}")
    result = {"settings": dataclasses.asdict(settings), "train_seconds": seconds, "log": log._asdict(),
              "evaluation": {rule: r._asdict() for rule, r in reports.items()}}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        echo(f"wrote {out}")
    return result
