"""Accelerating a whole network by perforation: the three experiments of the PerforatedCNNs paper, small.

On the Network-in-Network-style CNN trained here (upscaled 8x8 digits by default; cluttered
digits with ``--data cluttered-digits``):

1. **Single-layer mask comparison** — one layer (the most expensive 3x3 convolution, ``conv2``,
   with its 1x1 follower) perforated at several rates with each mask type (uniform, grid,
   structure, impact; random masks averaged over draws): test error against rate. Paper: grid
   and impact beat uniform.
2. **Whole-network greedy curves** (impact, grid; cost = measured time on the backend) against the
   stride and resolution baselines: test error against measured speedup, and the error at 2x and
   3x measured speedup for each method. Paper: perforation dominates the baselines.
3. **Theoretical vs measured speedup** of every greedy step on the Cython backend (and OpenCL if
   ``--opencl``). Paper: measured close to theoretical (about 80% with im2row + GEMM).

Also the activation memory implicit interpolation saves on the final greedy network.
Small settings by default (a few minutes on 2 shared cores); ``--full`` (or ``PONDER_FULL=1``)
for the larger network and data. Example::

    python scripts/perforation_experiments.py --out runs/perforation_small
    python scripts/perforation_experiments.py --full --out runs/perforation_full

Writes ``results.json`` and three figures (``single_layer.png``, ``greedy_vs_baselines.png``,
``theoretical_vs_measured.png``) to ``--out``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SMALL = {"scale": 4, "widths": [16, 32, 64], "epochs": 15, "held_out": 180, "impact_images": 300,
         "rates": [0.33, 0.5, 0.67, 0.75, 0.8], "draws": 2, "target_speedup": 3.2, "timing_batch": 64,
         "timing_repeats": 5, "stride_factors": [1, 2, 3], "resolutions": [0.875, 0.75, 0.625, 0.5],
         "canvas": 48, "n_train": 2000, "finetune_epochs": 2}
FULL = {"scale": 6, "widths": [32, 64, 128], "epochs": 20, "held_out": 180, "impact_images": 1000,
        "rates": [0.33, 0.5, 0.67, 0.75, 0.8, 0.9], "draws": 3, "target_speedup": 4.5, "timing_batch": 128,
        "timing_repeats": 7, "stride_factors": [1, 2, 3, 4], "resolutions": [0.875, 0.75, 0.625, 0.5, 0.375],
        "canvas": 48, "n_train": 5000, "finetune_epochs": 3}


def train_network(out, settings, data, backend, seed):
    """Train the NIN CNN with ``ponder train`` (reused if the checkpoint exists)."""
    from refimpl.cli import main

    checkpoint = out / "nin" / "checkpoint.npz"
    if not checkpoint.exists():
        args = ["train", "--model", "nin", "--data", data, "--epochs", str(settings["epochs"]), "--lr", "0.05",
                "--batch-size", "32", "--option", f"widths={json.dumps(settings['widths'])}", "--backend", backend, "--seed", str(seed),
                "--out", str(out / "nin"), "--quiet"]
        if data == "digits":
            args += ["--scale", str(settings["scale"])]
        else:
            args += ["--canvas", str(settings["canvas"]), "--n-train", str(settings["n_train"])]
        main(args)
    return checkpoint


def test_error(model, split, batch_size=256):
    from refimpl.greedy import measure_loss

    return measure_loss(model, split, batch_size)[1]


def experiment_single_layer(model, splits, settings, rng, layer="conv2"):
    """Error vs rate of one layer for every mask type (impact from the training subset)."""
    from refimpl.greedy import make_layer_mask, set_group_mask
    from refimpl.impact import find_perforable_layers, impact_maps

    x = splits["test"].images[:2]
    info = {i.name: i for i in find_perforable_layers(model, x)}[layer]
    impact_split = splits["train"].subset(slice(0, settings["impact_images"]))
    impact = impact_maps(model, impact_split.images, impact_split.labels, [layer])[layer]
    dense = test_error(model, splits["test"])
    curves = {}
    for kind in ("uniform", "grid", "structure", "impact"):
        curves[kind] = []
        for rate in settings["rates"]:
            draws = 1 if kind == "impact" else settings["draws"]
            errors, realised = [], []
            for _ in range(draws):
                mask = make_layer_mask(kind, info, 1.0 - rate, rng, impact)
                set_group_mask(model, info, mask)
                errors.append(test_error(model, splits["test"]))
                realised.append(1.0 - mask.mean())
            curves[kind].append({"rate": rate, "realised_rate": float(np.mean(realised)),
                                 "error": float(np.mean(errors)), "error_std": float(np.std(errors))})
        set_group_mask(model, info, None)
    return {"layer": layer, "out_hw": list(info.out_hw), "dense_error": dense, "curves": curves}


def experiment_grid_phase(model, splits, layer="conv2"):
    """Test error of the four regular every-other grids (row and column phase 0 or 1) of one layer.

    The grid mask at rate 0.75 is such a grid with a random phase on each axis; this shows how much
    the phase alone matters.
    """
    from refimpl.greedy import set_group_mask
    from refimpl.impact import find_perforable_layers

    info = {i.name: i for i in find_perforable_layers(model, splits["test"].images[:2])}[layer]
    errors = {}
    for row in (0, 1):
        for col in (0, 1):
            mask = np.zeros(info.out_hw, dtype=bool)
            mask[row::2, col::2] = True
            set_group_mask(model, info, mask)
            errors[f"rows from {row}, columns from {col}"] = test_error(model, splits["test"])
    set_group_mask(model, info, None)
    return {"layer": layer, "errors": errors}


def error_at(points, speedup, key="measured_speedup"):
    """Lowest test error among points at least ``speedup`` times faster (None if none is)."""
    errors = [p["test_error"] for p in points if p[key] >= speedup]
    return min(errors) if errors else None


def experiment_greedy(model, splits, settings, backend, rng, mask_types, timer, runner):
    """One greedy run; the test error of every step's network."""
    from refimpl.greedy import apply_step, perforate_network

    held_out = splits["val"].subset(slice(0, settings["held_out"]))
    impact = splits["train"].subset(slice(0, settings["impact_images"]))
    start = time.perf_counter()
    profile = perforate_network(model, held_out, settings["target_speedup"], mask_types=mask_types, cost="time",
                                backend=backend, rng=rng, impact_data=impact, timing_batch=settings["timing_batch"],
                                timing_repeats=settings["timing_repeats"], progress=True, timer=timer,
                                runner=runner)
    seconds = time.perf_counter() - start
    for step in profile.steps:
        apply_step(model, profile, step["step"])
        step["test_error"] = test_error(model, splits["test"])
    return profile, seconds


def retime(model, profile, backend, x, repeats, timer, runner):
    """Measured speedup of every step's network on another backend or with another runner."""
    from refimpl.greedy import apply_step, measure_time, use_backend

    use_backend(model, backend)
    times = []
    for step in profile.steps:
        apply_step(model, profile, step["step"])
        times.append(measure_time(model, x, repeats, timer, runner))
    return [times[0] / t for t in times]


def plot_all(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = results["single_layer"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, curve in single["curves"].items():
        ax.plot([p["realised_rate"] for p in curve], [p["error"] for p in curve], "o-", label=kind)
    ax.axhline(single["dense_error"], color="gray", ls=":", label="dense")
    ax.set_xlabel(f"perforation rate of {single['layer']} (+ its 1x1 follower)")
    ax.set_ylabel("test error")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "single_layer.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in results["greedy"].items():
        ax.plot([s["measured_speedup"] for s in run["steps"]], [s["test_error"] for s in run["steps"]], "o-",
                markersize=3, label=f"greedy {name}")
    for name, marker in (("stride", "s"), ("resolution", "^")):
        points = sorted((p for p in results["baselines"][name] if p["pareto"]), key=lambda p: p["measured_speedup"])
        ax.plot([p["measured_speedup"] for p in points], [p["test_error"] for p in points], marker + "--",
                label=f"{name} baseline (Pareto)")
    ax.set_xlabel("measured speedup")
    ax.set_ylabel("test error")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "greedy_vs_baselines.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    top = 1.0
    for name, run in results["greedy"].items():
        th = [s["theoretical_speedup"] for s in run["steps"]]
        for backend, measured in run["measured_by_backend"].items():
            ax.plot(th, measured, "o", markersize=4, label=f"{name}, {backend}")
            top = max(top, max(th), max(measured))
    ax.plot([1, top], [1, top], "k:", label="measured = theoretical")
    ax.plot([1, top], [0.8, 0.8 * top], "k--", alpha=0.4, label="80% of theoretical")
    ax.set_xlabel("theoretical speedup (FLOPs)")
    ax.set_ylabel("measured speedup")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "theoretical_vs_measured.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/perforation_small"))
    parser.add_argument("--full", action="store_true", default=os.environ.get("PONDER_FULL") == "1")
    parser.add_argument("--data", choices=("digits", "cluttered-digits"), default="digits")
    parser.add_argument("--backend", default=None, help="timing backend (default: cython when usable, else numpy)")
    parser.add_argument("--threads", type=int, default=1,
                        help="Cython threads for the timings (default 1: on a shared, loaded CPU an OpenMP team "
                             "waits for preempted threads at every barrier, which swamps the differences measured)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time measurements read the process CPU time (default; steady on a shared machine with "
                             "a single-threaded backend) or the wall time")
    parser.add_argument("--runner", choices=("implicit", "layers"), default="implicit",
                        help="how timed forwards run: implicit (compact activations, poolings on the backend; "
                             "default) or layers (model(x): filled maps, NumPy pooling)")
    parser.add_argument("--opencl", action="store_true", help="also time every greedy step on the OpenCL backend")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the experiments of an existing results.json in --out (only add what is missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import fastpath
    from refimpl.checkpoint import load_checkpoint
    from refimpl.datasets import load_dataset

    settings = FULL if args.full else SMALL
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    backend = args.backend or ("cython" if fastpath.available_backends()["cython"].usable else "numpy")
    train_backend = backend  # training: the backend by name, with its default threads
    backend_label = backend if backend != "cython" else f"cython ({args.threads} thread{'s' * (args.threads > 1)})"
    if backend == "cython":
        from fastpath.cython_backend import CythonBackend

        backend = CythonBackend(threads=args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = train_network(out, settings, args.data, train_backend, args.seed)
    model, meta = load_checkpoint(checkpoint, backend=backend)
    data = dict(meta["extra"]["data"])
    splits, _ = load_dataset(data.pop("name"), **data)
    rng = np.random.default_rng(args.seed)
    if args.reuse and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())
    else:
        results = run_experiments(args, settings, model, splits, backend, backend_label, timer, rng, checkpoint, out)
    if "grid_phase" not in results:
        results["grid_phase"] = experiment_grid_phase(model, splits)
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=1, default=float)
    if settings["finetune_epochs"] and "finetuned" not in results:
        print("== fine-tuning the networks at about 2x measured speedup", flush=True)
        results["finetuned"] = experiment_finetune(checkpoint, backend, splits, results, settings, out, args.seed)
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=1, default=float)
    plot_all(results, out)
    print_tables(results)
    return results


def run_experiments(args, settings, model, splits, backend, backend_label, timer, rng, checkpoint, out):
    """Experiments 1-3 (see the module docstring); returns the results dict."""
    import fastpath
    from refimpl.baselines import resolution_baseline, stride_baseline
    from refimpl.greedy import apply_step, use_backend
    from refimpl.implicit_network import run_implicit

    results = {"settings": settings, "data": args.data, "backend": backend_label, "clock": args.clock,
               "runner": args.runner, "checkpoint": str(checkpoint),
               "image_hw": list(splits["test"].images.shape[2:]), "test_images": len(splits["test"])}

    print("== experiment 1: one layer, every mask type", flush=True)
    results["single_layer"] = experiment_single_layer(model, splits, settings, rng)

    print("== experiment 2: greedy (cost = measured time) vs baselines", flush=True)
    results["greedy"] = {}
    timing_x = splits["val"].images[: settings["timing_batch"]]
    for name, kinds in (("impact", ("impact",)), ("grid", ("grid",))):
        profile, seconds = experiment_greedy(model, splits, settings, backend, rng, kinds, timer, args.runner)
        profile.save(out / f"profile_{name}.json")
        label = f"{backend_label}, {args.runner} runner"
        run = {"seconds": seconds, "steps": profile.steps, "measured_by_backend": {
            label: [s["measured_speedup"] for s in profile.steps]}}
        # the greedy's own timings were taken while choosing; re-time all steps once more, in one go,
        # with both runners
        for runner in ("implicit", "layers"):
            run["measured_by_backend"][f"{backend_label}, {runner} runner, re-timed"] = retime(
                model, profile, backend, timing_x, settings["timing_repeats"], timer, runner)
        if args.opencl and fastpath.available_backends()["opencl"].usable:
            try:
                # wall time: PoCL runs its own worker threads, which the process CPU time would sum
                run["measured_by_backend"][f"opencl (PoCL, CPU, wall time), {args.runner} runner"] = retime(
                    model, profile, "opencl", timing_x, settings["timing_repeats"], time.perf_counter, args.runner)
            except ValueError as exc:  # reported, not hidden
                run["opencl_error"] = str(exc)
                print(f"OpenCL re-timing failed: {exc}", flush=True)
            use_backend(model, backend)
        results["greedy"][name] = run
        if name == "impact":
            apply_step(model, profile, len(profile.steps) - 1)
            _, memory = run_implicit(model, splits["test"].images[:64].astype(np.float32))
            results["implicit_memory_64_images"] = memory.to_dict()
        apply_step(model, profile, 0)

    held_out = splits["val"].subset(slice(0, settings["held_out"]))
    timing = {"timing_batch": settings["timing_batch"], "timing_repeats": settings["timing_repeats"], "timer": timer,
              "runner": args.runner}
    stride = stride_baseline(model, held_out, settings["stride_factors"], backend, **timing)
    h, w = results["image_hw"]
    sizes = [(int(round(f * h)), int(round(f * w))) for f in settings["resolutions"]]
    resolution = resolution_baseline(model, held_out, [(h, w)] + sizes, backend, **timing)
    # test errors of the baselines (the choice of points used the validation subset, as the greedy did)
    from refimpl.baselines import resize_images, set_stride_factor
    from refimpl.datasets import Split
    from refimpl.impact import find_perforable_layers

    infos = find_perforable_layers(model, timing_x[:2])
    for point in stride:
        for info in infos:
            set_stride_factor(model, info, point["factors"][info.name])
        point["test_error"] = test_error(model, splits["test"])
    for info in infos:
        set_stride_factor(model, info, 1)
    for point in resolution:
        small = Split(resize_images(splits["test"].images, point["size"]), splits["test"].labels)
        point["test_error"] = test_error(model, small)
    results["baselines"] = {"stride": stride, "resolution": resolution}

    table = {}
    for name, run in results["greedy"].items():
        table[f"greedy {name}"] = {f"{s}x": error_at(run["steps"], s) for s in (2, 3)}
    for name, points in results["baselines"].items():
        table[f"{name} baseline"] = {f"{s}x": error_at(points, s) for s in (2, 3)}
    results["error_at_measured_speedup"] = table
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


def pick_near(points, speedup=2.0, key="measured_speedup"):
    """The point of lowest validation error at least ``speedup`` times faster, else the fastest one."""
    fast = [p for p in points if p[key] >= speedup]
    return min(fast, key=lambda p: p["error"]) if fast else max(points, key=lambda p: p[key])


def experiment_finetune(checkpoint, backend, splits, results, settings, out, seed):
    """Fine-tune (SGD, lr 0.01) the network each method offers at about 2x measured speedup.

    The point is chosen on the validation error, as in the greedy procedure; the test error is
    reported before and after ``finetune_epochs`` epochs on the training split.
    """
    from refimpl.baselines import resize_images, set_stride_factor
    from refimpl.checkpoint import load_checkpoint
    from refimpl.datasets import Split
    from refimpl.greedy import apply_step, load_profile
    from refimpl.impact import find_perforable_layers
    from refimpl.optim import SGD
    from refimpl.training import fit

    def tune(model, train):
        fit(model, SGD(model.named_parameters(), lr=0.01, momentum=0.9), train, epochs=settings["finetune_epochs"],
            batch_size=32, rng=np.random.default_rng(seed + 1), progress=False)

    finetuned = {}
    for name in results["greedy"]:
        profile = load_profile(out / f"profile_{name}.json")
        point = pick_near(results["greedy"][name]["steps"])
        model, _ = load_checkpoint(checkpoint, backend=backend)
        apply_step(model, profile, point["step"])
        tune(model, splits["train"])
        finetuned[f"greedy {name}"] = {"step": point["step"], "before": point["test_error"],
                                       "after": test_error(model, splits["test"])}
    point = pick_near(results["baselines"]["stride"])
    model, _ = load_checkpoint(checkpoint, backend=backend)
    for info in find_perforable_layers(model, splits["test"].images[:2]):
        set_stride_factor(model, info, point["factors"][info.name])
    tune(model, splits["train"])
    finetuned["stride baseline"] = {"factors": point["factors"], "before": point["test_error"],
                                    "after": test_error(model, splits["test"])}
    point = pick_near(results["baselines"]["resolution"])
    model, _ = load_checkpoint(checkpoint, backend=backend)
    resized = {k: Split(resize_images(splits[k].images, point["size"]), splits[k].labels) for k in ("train", "test")}
    tune(model, resized["train"])
    finetuned["resolution baseline"] = {"size": point["size"], "before": point["test_error"],
                                        "after": test_error(model, resized["test"])}
    for name, row in finetuned.items():
        source = (results["greedy"][name.split()[1]]["steps"][row["step"]] if name.startswith("greedy") else
                  next(p for p in results["baselines"][name.split()[0]]
                       if p.get("factors") == row.get("factors") and p.get("size") == row.get("size")))
        row.update(theoretical_speedup=source["theoretical_speedup"], measured_speedup=source["measured_speedup"])
    return finetuned


def print_tables(results):
    single = results["single_layer"]
    print(f"\nExperiment 1 — test error, {single['layer']} perforated (dense {single['dense_error']:.4f})")
    rates = [p["rate"] for p in next(iter(single["curves"].values()))]
    print("rate       " + " ".join(f"{r:>8.2f}" for r in rates))
    for kind, curve in single["curves"].items():
        print(f"{kind:10s} " + " ".join(f"{p['error']:8.4f}" for p in curve))
    if "grid_phase" in results:
        phase = results["grid_phase"]
        print(f"regular every-other grids of {phase['layer']}: "
              + ", ".join(f"{k}: {v:.4f}" for k, v in phase["errors"].items()))
    print("\nExperiment 2 — test error at a measured speedup of at least 2x / 3x")
    for name, row in results["error_at_measured_speedup"].items():
        cells = " ".join("      --" if v is None else f"{v:8.4f}" for v in row.values())
        print(f"{name:22s} {cells}")
    print("\nExperiment 3 — theoretical vs measured speedup per greedy step")
    for name, run in results["greedy"].items():
        for backend, measured in run["measured_by_backend"].items():
            th = [s["theoretical_speedup"] for s in run["steps"]]
            pairs = ", ".join(f"{t:.2f}/{m:.2f}" for t, m in zip(th, measured))
            ratio = [m / t for t, m in zip(th, measured) if t > 1.2]
            extra = f"; mean measured/theoretical (steps above 1.2x) = {np.mean(ratio):.2f}" if ratio else ""
            print(f"{name} on {backend}: {pairs}{extra}")
    if "finetuned" in results:
        print("\nFine-tuned (SGD lr 0.01) at about 2x measured speedup — test error before -> after")
        for name, row in results["finetuned"].items():
            print(f"{name:22s} {row['theoretical_speedup']:.2f}x theoretical, {row['measured_speedup']:.2f}x measured: "
                  f"{row['before']:.4f} -> {row['after']:.4f}")
    if "implicit_memory_64_images" in results:
        mem = results["implicit_memory_64_images"]
        print(f"\nImplicit interpolation, final impact network, 64 images: activations {mem['explicit_bytes'] / 2**20:.2f} MiB "
              f"-> {mem['implicit_bytes'] / 2**20:.2f} MiB (saved {mem['saved_bytes'] / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
