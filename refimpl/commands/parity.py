"""``ponder parity``: train an ACT RNN on the parity task with one objective and report ponder steps.

Examples::

    ponder parity --objective act
    ponder parity --objective pact --temperature 0.5 --tau 0.001 --out runs/parity-pact.json
    ponder parity --objective pondernet --beta 0.01 --prior-rate 0.2 --size 64 --steps 100000

The training log is printed as it trains. Afterwards fresh examples are evaluated with every
halting rule that fits the objective (``act`` for ACT; ``thresholded`` and ``sample`` for PACT and
PonderNet): the accuracy and the mean ponder steps by the number of non-zero entries. ``--out``
writes the same as JSON. The defaults (8 entries, 5,000 steps) learn parity with each objective;
settings known not to (the paper's 64 entries with a few thousand steps) get a warning first.

``ponder train --task parity`` runs the same experiment
(:func:`refimpl.commands.parity_experiment.run_parity_experiment`).
"""

from __future__ import annotations

from .arguments import float_in, non_negative_float, non_negative_int, positive_float, positive_int, required_group
from .parity_experiment import ParitySettings, run_parity_experiment


def add_arguments(parser):
    from ..act_rnn import OBJECTIVES

    default = ParitySettings.default
    required_group(parser).add_argument(
        "--objective", choices=OBJECTIVES, required=True,
        help="act: Graves' N+R ponder cost; pact: relaxed probabilistic ACT; pondernet: PonderNet loss")
    parser.add_argument("--size", type=positive_int, default=default("size"),
                        help="entries per parity vector (the paper uses 64, which needs ~100x more steps)")
    parser.add_argument("--steps", type=positive_int, default=default("steps"), help="training iterations")
    parser.add_argument("--batch-size", type=positive_int, default=default("batch_size"), help="examples per step")
    parser.add_argument("--hidden", type=positive_int, default=default("hidden"), help="tanh units")
    parser.add_argument("--max-steps", type=positive_int, default=default("max_steps"),
                        help="cap M on ponder steps per input")
    parser.add_argument("--lr", type=positive_float, default=default("lr"), help="Adam learning rate")
    parser.add_argument("--tau", type=non_negative_float, default=default("tau"), help="ponder penalty (act, pact)")
    parser.add_argument("--temperature", type=positive_float, default=default("temperature"),
                        help="relaxed Bernoulli temperature (pact)")
    parser.add_argument("--beta", type=non_negative_float, default=default("beta"), help="KL weight (pondernet)")
    parser.add_argument("--prior-rate", type=float_in(0.0, 1.0, closed_low=False, closed_high=True), default=default("prior_rate"),
                        help="λ_p in (0, 1] of the truncated geometric prior (pondernet)")
    parser.add_argument("--halting-bias", type=float, default=default("halting_bias"),
                        help="initial bias of the halting unit")
    parser.add_argument("--eval-size", type=positive_int, default=default("eval_size"),
                        help="fresh examples for evaluation")
    parser.add_argument("--seed", type=non_negative_int, default=default("seed"), help="seed of every random draw")
    parser.add_argument("--threads", type=positive_int, default=default("threads"),
                        help="BLAS threads (the matrices are small)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (default: not written)")


def run(args):
    names = ParitySettings.field_types()
    settings = ParitySettings(**{name: getattr(args, name) for name in names})
    run_parity_experiment(settings, out=args.out)
    return 0
