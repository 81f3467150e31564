"""``ponder demo``: perforate a convolution of a photo with every mask type and fill.

The demo is a list of *sections* (:data:`SECTIONS`). Each section is a function
``section(ctx) -> SectionResult`` that computes something on the shared :class:`DemoContext`
(the photo, one convolution layer, the backend, a seeded generator), returns a table and the
checks it failed, and may draw figures into the output folder. Adding a section (fast backends
agreeing with the reference, an SACT ponder-cost map, ...) is one function and one entry in
``SECTIONS``.

Every check compares against the dense float convolution of :mod:`refimpl.conv`; the command
exits with status 1 if any error exceeds :data:`TOLERANCE` for the layer's dtype.
"""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.backend import get_backend
from refimpl.conv import conv2d_forward, conv_flops
from refimpl.datasets import load_photo
from refimpl.implicit import implicit_memory_saved, implicit_pool2d_forward
from refimpl.masks import MASK_TYPES, impact_scores, make_mask
from refimpl.perforation import FILLS, PerforationPlan, perforated_conv2d_forward, perforated_conv_flops
from refimpl.pooling import pool2d_forward

from .arguments import add_backend_argument, float_in, int_at_least, non_negative_int

#: Largest accepted ``|perforated - dense|`` at computed positions, by dtype.
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

#: The pooling layer assumed to follow the convolution (structure masks, implicit pooling).
POOL = {"size": 3, "stride": 2, "padding": 1}

#: Smallest photo side: the SACT section's network downsamples by 4 and pools globally.
MIN_SIZE = 8

#: Width at which table notes (e.g. why a backend was skipped) are wrapped.
NOTE_WIDTH = 100


def add_arguments(parser):
    parser.add_argument("--out", type=Path, default=Path("ponder-demo"), help="folder for the PNG figures (created)")
    parser.add_argument("--rate", type=float_in(0.0, 1.0), default=0.75,
                        help="requested perforation rate r in [0, 1): the fraction of positions skipped")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the numpy.random.Generator")
    add_backend_argument(parser, help_text="convolution backend of the perforated layer")
    parser.add_argument("--size", type=int_at_least(MIN_SIZE), default=128,
                        help=f"side of the downscaled photo in pixels (at least {MIN_SIZE})")


# ---------------------------------------------------------------------------------------------
# Shared state and results
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoContext:
    """Everything the sections share: one photo, one 3x3 convolution layer, one backend."""

    x: np.ndarray  # (1, 3, S, S) float32 photo in [0, 1]
    w: np.ndarray  # (K, 3, 3, 3)
    b: np.ndarray  # (K,)
    stride: int
    padding: int
    rate: float
    rng: np.random.Generator
    backend: object
    out_dir: Path
    dense: np.ndarray = None  # (1, K, Ho, Wo): the dense convolution, the reference of every check
    masks: dict = field(default_factory=dict)  # kind -> (Ho, Wo) bool, filled by the first section
    outputs: dict = field(default_factory=dict)  # (kind, fill) -> (1, K, Ho, Wo)

    @property
    def tolerance(self):
        return TOLERANCE[self.x.dtype]


@dataclass
class SectionResult:
    """A section's table, the checks it failed (empty = passed) and the files it wrote.

    ``explanation`` is one sentence printed under the title: what the numbers measure and why they
    differ from the ideal. ``notes`` are printed wrapped below the table (long texts such as the
    reason a backend was skipped), so they never widen a column.
    """

    title: str
    columns: list
    rows: list
    failures: list = field(default_factory=list)
    files: list = field(default_factory=list)
    explanation: str = ""
    notes: list = field(default_factory=list)

    def note(self, text):
        """Add a note below the table; returns its marker (``"note 1"``, ...) to put in a cell."""
        self.notes.append(text)
        return f"note {len(self.notes)}"

    def format(self):
        cells = [[str(c) for c in self.columns]] + [[_cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        numeric = [all(_is_number(row[i]) for row in self.rows) for i in range(len(self.columns))]
        lines = [self.title, "=" * len(self.title)]
        if self.explanation:
            lines += textwrap.wrap(self.explanation, NOTE_WIDTH)
        for i, row in enumerate(cells):
            # Text columns left-aligned, numbers right-aligned (their headers too).
            lines.append("  ".join(v.rjust(wd) if num else v.ljust(wd)
                                   for v, wd, num in zip(row, widths, numeric)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * wd for wd in widths))
        for k, text in enumerate(self.notes, start=1):
            lines += textwrap.wrap(text, NOTE_WIDTH, initial_indent=f"note {k}: ", subsequent_indent="  ",
                                   break_on_hyphens=False)
        return "\n".join(lines)


def _is_number(value):
    """A number, or text that reads as one (``"12%"``, ``"-"`` for "not applicable")."""
    if isinstance(value, str):
        return re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?|-|", value) is not None
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.3g}" if (value == 0 or 1e-3 <= abs(value) < 1e4) else f"{value:.2e}"
    return str(value)


def make_context(args):
    rng = np.random.default_rng(args.seed)
    x = load_photo("astronaut", size=(args.size, args.size))[None]  # (1, 3, size, size) in [0, 1]
    k = 8
    w = (rng.standard_normal((k, 3, 3, 3)) / np.sqrt(3 * 9)).astype(np.float32)
    # Channel 0 is a horizontal edge detector on the grey image, so the pictures show structure.
    w[0] = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float32) / 3.0
    b = np.zeros(k, dtype=np.float32)
    return DemoContext(x=x, w=w, b=b, stride=1, padding=1, rate=args.rate, rng=rng,
                       backend=get_backend(args.backend), out_dir=args.out)


def _best_time(fn, repeats=3):
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def perforation_section(ctx):
    """Every mask type and fill against the dense convolution; draws the masks and outputs."""
    n, c = ctx.x.shape[:2]
    k, _, kh, kw = ctx.w.shape
    ctx.dense, dense_time = _best_time(
        lambda: conv2d_forward(ctx.x, ctx.w, ctx.b, ctx.stride, ctx.padding)[0])
    out_hw = ctx.dense.shape[2:]
    dense_flops = conv_flops(n * out_hw[0] * out_hw[1], c, k, (kh, kw))
    result = SectionResult(
        f"Perforated convolution of a {ctx.x.shape[2]}x{ctx.x.shape[3]} photo: C={c}, K={k}, "
        f"{kh}x{kw}, backend {ctx.backend.name}, {ctx.x.dtype}",
        ["mask", "fill", "rate", "realised", "MFLOPs", "ideal-speedup", "measured", "max|err|", "time ms"],
        [["dense", "-", 0.0, 0.0, dense_flops / 1e6, 1.0, 1.0, 0.0, dense_time * 1e3]],
        explanation=("measured = dense / perforated time of this layer (best of 3); it stays below the ideal "
                     "1 / (1 - realised) because gathering and filling cost the same at any rate."),
    )
    # Impact: the squared-output loss L = ½ Σ V² has ∂L/∂V = V, so impact = mean Σ_c V².
    impact = impact_scores(ctx.dense, ctx.dense)
    extra = {"structure": {"pool_size": POOL["size"], "pool_stride": POOL["stride"],
                           "pool_padding": POOL["padding"]},
             "impact": {"impact": impact}}
    for kind in MASK_TYPES:
        mask = make_mask(kind, out_hw, ctx.rate, ctx.rng, **extra.get(kind, {}))
        ctx.masks[kind] = mask
        plan = PerforationPlan(mask)
        _ = plan.index_map  # computed once per mask, outside the timed layer
        flops = perforated_conv_flops(plan, n, c, k, (kh, kw))
        for fill in FILLS:
            out, seconds = _best_time(lambda: ctx.backend.to_host(perforated_conv2d_forward(
                ctx.x, ctx.w, ctx.b, plan, ctx.stride, ctx.padding, fill=fill, backend=ctx.backend)[0]))
            ctx.outputs[kind, fill] = out
            error = float(np.abs(out - ctx.dense)[:, :, mask].max())
            result.rows.append([kind, fill, ctx.rate, plan.rate, flops / 1e6, dense_flops / flops,
                                dense_time / seconds, error, seconds * 1e3])
            if not error <= ctx.tolerance:
                result.failures.append(f"{kind}/{fill}: max error {error:.3g} > {ctx.tolerance:g}")
            result.failures.extend(_check_fill(out, plan, fill, f"{kind}/{fill}"))
    result.files.append(_draw_perforation(ctx))
    return result


def _check_fill(out, plan, fill, label):
    """The skipped positions hold exactly what the fill rule says (a copy, or zero)."""
    mask, index_map = plan.mask[0], plan.index_map[0]
    compact = out[:, :, mask]  # (N, K, P) in raster order
    expected = compact[:, :, index_map] if fill == "nearest" else np.zeros_like(out)
    if not np.array_equal(out[:, :, ~mask], expected[:, :, ~mask]):
        return [f"{label}: skipped positions differ from the {fill} fill rule"]
    return []


def implicit_section(ctx):
    """Max/avg pooling read through an index table equals pooling the filled tensor."""
    result = SectionResult(
        f"Implicit interpolation: {POOL['size']}x{POOL['size']}/{POOL['stride']} pooling read from the compact tensor",
        ["mask", "pool", "max|err| vs filled", "KiB saved", "of dense"], [],
        explanation=("max|err|: pooling read through an index table vs pooling the filled map (ideally 0, "
                     "rounding at most); KiB saved: skipped positions never stored."))
    n, k = ctx.dense.shape[:2]
    dense_bytes = ctx.dense.nbytes
    for kind, mask in ctx.masks.items():
        plan = PerforationPlan(mask)
        compact, _ = perforated_conv2d_forward(ctx.x, ctx.w, ctx.b, plan, ctx.stride, ctx.padding,
                                               output="compact", backend=ctx.backend)
        compact = ctx.backend.to_host(compact)
        saved = implicit_memory_saved(plan, n, k, ctx.x.dtype.itemsize)
        for mode in ("max", "avg"):
            implicit, _ = implicit_pool2d_forward(compact, plan, mode, POOL["size"], POOL["stride"],
                                                  POOL["padding"], backend=ctx.backend)
            explicit, _ = pool2d_forward(ctx.outputs[kind, "nearest"], mode, POOL["size"],
                                         POOL["stride"], POOL["padding"])
            error = float(np.abs(ctx.backend.to_host(implicit) - explicit).max())
            result.rows.append([kind, mode, error, saved / 1024, f"{saved / dense_bytes:.0%}"])
            if not error <= ctx.tolerance:
                result.failures.append(f"implicit {kind}/{mode}: max error {error:.3g} > {ctx.tolerance:g}")
    return result


def fast_backends_section(ctx):
    """Every fast backend installed here against the NumPy reference, forward and backward.

    Backends are found by name through the ``ponder.backends`` entry points (refimpl never imports
    fastpath); one that cannot run here is listed with the reason and the fix.
    """
    from refimpl.backend import BackendUnavailableError, known_backends
    from refimpl.perforation import perforated_conv2d_backward

    result = SectionResult(
        "Fast backends vs the NumPy reference (same masks, same fills)",
        ["backend", "mask/fill", "fwd max|err|", "bwd rel err", "time ms", "numpy ms", "status"], [],
        explanation=("errors against the NumPy reference (float32 rounding expected); times: one forward of "
                     "this small layer, where call overhead, not arithmetic, dominates."))
    reference = get_backend("numpy")
    dout = ctx.rng.standard_normal(ctx.dense.shape).astype(ctx.x.dtype)
    for name in known_backends():
        if name == "numpy":
            continue
        try:
            backend = get_backend(name)
        except BackendUnavailableError as exc:
            result.rows.append([name, "-", "-", "-", "-", "-", f"skipped ({result.note(f'{name}: {exc}')})"])
            continue
        if not backend.supports_dtype(ctx.x.dtype):
            result.rows.append([name, "-", "-", "-", "-", "-", f"skipped (no {ctx.x.dtype})"])
            continue
        for (kind, fill), expected in ctx.outputs.items():
            plan = PerforationPlan(ctx.masks[kind])
            _ = plan.index_map

            def forward(on):
                out, cache = perforated_conv2d_forward(ctx.x, ctx.w, ctx.b, plan, ctx.stride,
                                                       ctx.padding, fill=fill, backend=on)
                return on.to_host(out), cache

            (out, cache), seconds = _best_time(lambda: forward(backend))
            (_, ref_cache), ref_seconds = _best_time(lambda: forward(reference), repeats=1)
            error = float(np.abs(out - expected).max())
            grads = [backend.to_host(g) for g in perforated_conv2d_backward(dout, cache)]
            ref_grads = perforated_conv2d_backward(dout, ref_cache)
            grad_error = max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))
                             for g, r in zip(grads, ref_grads))
            ok = error <= ctx.tolerance * max(1.0, float(np.abs(expected).max())) and grad_error <= 1e-4
            result.rows.append([name, f"{kind}/{fill}", error, grad_error, seconds * 1e3,
                                ref_seconds * 1e3, "agrees" if ok else "DIFFERS"])
            if not ok:
                result.failures.append(f"{name} {kind}/{fill}: forward error {error:.3g}, "
                                       f"backward relative error {grad_error:.3g}")
    return result


#: The shipped model the SACT section runs (see docs/howto/pretrained_models.md).
SACT_MODEL = "sact-resnet14-digits32"


def sact_demo_section(ctx):
    """The shipped, trained SACT-ResNet-14 on fresh cluttered digits, and its computation-time map.

    The model (:func:`refimpl.pretrained.load_pretrained`) was trained on 32 px cluttered digits;
    the section draws new images of that kind (seeded by ``--seed``), runs the network sparsely and
    checks that sparse execution equals the dense masked execution. Its table shows ρ per block,
    the fraction of positions still active after each block's first unit and the FLOPs saved; the
    map ``sact_map.png`` draws Σ ρ over the first image, where a trained network spends more units
    on the digit than on the clutter. The recorded test figures of the model are quoted from its
    metadata, not measured here.
    """
    from refimpl.datasets import load_cluttered_digits
    from refimpl.pretrained import load_pretrained

    from .drawing import draw_map

    model, meta = load_pretrained(SACT_MODEL, backend=ctx.backend)
    canvas = meta["data"]["canvas"]
    seed = int(ctx.rng.integers(2**31))
    images = load_cluttered_digits(canvas=canvas, n_train=0, n_val=0, n_test=4, seed=seed)["test"].images
    images = np.ascontiguousarray(images, dtype=model.param_dtype)
    sparse = model(images)
    per_image = model.flops_per_sample.astype(float)
    sparse_flops, cmap = float(per_image.mean()), model.ponder_map(images.shape[2:])[0]
    blocks = [(len(b.units), float(b.rho.mean()), float(b.active_masks[1].mean())) for b in model.stages]
    model.set_execution("dense")
    dense = model(images)
    dense_flops = float(model.flops_per_sample.mean())
    error = float(np.abs(sparse - dense).max())
    recorded = meta["evaluation"]
    result = SectionResult(
        f"SACT: the shipped {SACT_MODEL} (trained) on {len(images)} new {canvas}px cluttered digits",
        ["block", "units", "mean rho", "active after unit 1", "MFLOPs sparse", "MFLOPs dense", "max|err| vs dense"],
        [[f"stage {i + 1}", units, rho, active, "", "", ""] for i, (units, rho, active) in enumerate(blocks)]
        + [["network", "-", "", "", sparse_flops / 1e6, dense_flops / 1e6, error]],
        explanation=(f"rho per block and the FLOPs that sparse execution saves, per image; sparse must equal "
                     f"the dense masked execution (max|err| ~ 0). Recorded on its test split, not measured here: "
                     f"accuracy {recorded['accuracy']:.3f}, map AUC {recorded['map_auc']:.3f} against the "
                     f"object (centre baseline {recorded['centre_auc']:.3f})."))
    if not error <= ctx.tolerance * max(1.0, float(np.abs(dense).max())):
        result.failures.append(f"SACT sparse vs dense masked execution: max error {error:.3g}")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / "sact_map.png"
    draw_map(images[0], cmap, path, f"trained SACT ({SACT_MODEL}): {per_image[0] / 1e6:.1f} "
             f"of {dense_flops / 1e6:.1f} MFLOPs on this image")
    result.files.append(path)
    return result


def dense_twin(model, backend=None):
    """The plain :class:`~refimpl.resnet.ResNet` with the stem, units and head of an adaptive ResNet ``model``.

    Same names, same arrays (copied): the dense network the adaptive one saves FLOPs against.
    """
    from refimpl.resnet import ResNet

    dense = ResNet(model.n, model.head[3].out_features, model.stem.params["w"].shape[1], np.random.default_rng(0),
                   widths=model.widths, backend=backend, dtype=model.param_dtype)
    params = {name: p for name, p, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    for name, p, _ in dense.named_parameters():
        p[...] = params[name]
    for name, b in dense.named_buffers():
        b[...] = buffers[name]
    dense.eval()
    return dense


#: Images and interleaved rounds of the speed section (small: the demo stays short).
SPEED_IMAGES, SPEED_ROUNDS = 16, 5


def adaptive_speed_section(ctx):
    """Images per second of the shipped SACT-ResNet-14 against its dense twin, timed in interleaved rounds.

    Both networks run on the demo's backend in evaluation mode on the same new cluttered digits;
    each round runs each once (:func:`refimpl.measurement.interleaved_times`), so a busy moment of
    the machine slows both. The table shows the median and the min–max of the rounds: on a shared
    machine the spread says how far to trust the ratio. ``ponder bench --networks`` (from
    ``fastpath``) is the full benchmark.
    """
    from refimpl.datasets import load_cluttered_digits
    from refimpl.measurement import interleaved_times
    from refimpl.pretrained import load_pretrained

    model, meta = load_pretrained(SACT_MODEL, backend=ctx.backend)
    model.eval()
    dense = dense_twin(model, ctx.backend)
    seed = int(ctx.rng.integers(2**31))
    images = load_cluttered_digits(canvas=meta["data"]["canvas"], n_train=0, n_val=0, n_test=SPEED_IMAGES,
                                   seed=seed)["test"].images
    images = np.ascontiguousarray(images, dtype=model.param_dtype)
    networks = {"dense ResNet-14": dense, "SACT-ResNet-14": model}
    times = interleaved_times([lambda m=m: m(images) for m in networks.values()], SPEED_ROUNDS)
    flops = {name: float(m.flops_per_sample.mean()) for name, m in networks.items()}
    medians = {name: float(np.median(t)) for name, t in zip(networks, times)}
    dense_name = "dense ResNet-14"
    rows = [[name, flops[name] / 1e6, flops[dense_name] / flops[name], medians[name] * 1e3, min(t) * 1e3,
             max(t) * 1e3, len(images) / medians[name], medians[dense_name] / medians[name]]
            for name, t in zip(networks, times)]
    sact_speedup = rows[1][-1]
    verdict = ("faster than" if sact_speedup > 1 else "not faster than") + " its dense twin here"
    return SectionResult(
        f"Speed: SACT against its dense twin, {len(images)} images, {SPEED_ROUNDS} interleaved rounds, "
        f"{ctx.backend.name} backend",
        ["network", "MFLOPs/image", "FLOPs ratio", "ms median", "ms min", "ms max", "images/s", "speedup"], rows,
        explanation=(f"Measured now: SACT is {verdict} ({sact_speedup:.2f}x the dense images/s for "
                     f"{rows[1][2]:.2f}x fewer FLOPs). Timings of a busy machine vary; the min-max columns "
                     f"show by how much. ponder bench --networks times the full set."))


#: The demo, in order. A later section may use what an earlier one stored on the context.
SECTIONS = [perforation_section, implicit_section, fast_backends_section, sact_demo_section, adaptive_speed_section]


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _draw_perforation(ctx):
    """Photo and dense output on top; one row per mask: mask, nearest fill, zero fill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channel = 0
    lim = float(np.abs(ctx.dense[0, channel]).max())
    show = {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim, "interpolation": "nearest"}
    kinds = list(ctx.masks)
    fig, axes = plt.subplots(len(kinds) + 1, 3, figsize=(6.6, 2.25 * (len(kinds) + 1)), dpi=72)
    axes[0, 0].imshow(ctx.x[0].transpose(1, 2, 0))
    axes[0, 0].set_title("photo")
    axes[0, 1].imshow(ctx.dense[0, channel], **show)
    axes[0, 1].set_title("dense conv (edges)")
    axes[0, 2].axis("off")
    axes[0, 2].text(0.0, 0.5, f"requested rate {ctx.rate:g}\nblack = computed\n"
                    f"structure: {POOL['size']}x{POOL['size']}/{POOL['stride']} pool\n"
                    "impact: loss ½ΣV²", va="center", fontsize=9)
    for row, kind in enumerate(kinds, start=1):
        mask = ctx.masks[kind]
        axes[row, 0].imshow(~mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[row, 0].set_title(f"{kind} ({1 - mask.mean():.2f})")
        for col, fill in enumerate(FILLS, start=1):
            axes[row, col].imshow(ctx.outputs[kind, fill][0, channel], **show)
            axes[row, col].set_title(f"{fill} fill")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / "perforation.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run(args):
    start = time.perf_counter()
    ctx = make_context(args)
    failures, files = [], []
    for section in SECTIONS:
        result = section(ctx)
        print(result.format(), end="\n\n")
        failures += result.failures
        files += result.files
    for path in files:
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.1f} s")
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print(f"all checks passed (tolerance {ctx.tolerance:g} for {ctx.x.dtype})")
    return 0
