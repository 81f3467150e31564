"""``ponder reproduce``: intervals, the small tier of every claim, resuming, bad arguments, the results page."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from refimpl import cli
from refimpl.commands.arguments import UsageExit
from refimpl.reproduce import CLAIMS, Claim, ReproductionError, mean_interval, paired_difference, run_claim
from refimpl.reproduce.claim import VERDICTS, Verdict
from refimpl.reproduce import registry
from refimpl.reproduce.intervals import above_zero, below_zero
from refimpl.reproduce.report import results_markdown
from refimpl.reproduce.runner import run_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- intervals ------------------------------------------------------------------------------------


def test_t_interval_of_a_known_sample():
    # mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.7764451: half width 2.7764451 * sqrt(2.5) / sqrt(5) = 1.9632
    interval = mean_interval([1, 2, 3, 4, 5])
    assert interval["mean"] == pytest.approx(3.0)
    assert interval["std"] == pytest.approx(np.sqrt(2.5))
    assert interval["low"] == pytest.approx(3.0 - 1.963243, abs=1e-5)
    assert interval["high"] == pytest.approx(3.0 + 1.963243, abs=1e-5)
    assert interval["n"] == 5 and interval["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_t_interval_of_two_values_uses_twelve_point_seven():
    # t_{0.975, 1} = 12.706205; s of (0, 2) is sqrt(2); half width 12.706205 * sqrt(2) / sqrt(2)
    interval = mean_interval([0.0, 2.0])
    assert (interval["low"], interval["high"]) == pytest.approx((1 - 12.706205, 1 + 12.706205), abs=1e-5)


def test_one_value_has_no_interval_and_counts_as_nothing_shown():
    interval = mean_interval([0.7])
    assert interval["mean"] == 0.7 and interval["low"] is None and interval["high"] is None
    assert not above_zero(interval) and not below_zero(interval)


def test_t_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(1.5, 2.0, size=(4000, 3))
    covered = np.mean([mean_interval(s)["low"] <= 1.5 <= mean_interval(s)["high"] for s in samples])
    assert 0.935 <= covered <= 0.965  # binomial sd at 4000 draws: 0.0034


def test_paired_difference_removes_the_shared_variation():
    a, b = np.array([0.50, 0.70, 0.90]), np.array([0.48, 0.68, 0.89])  # b always a bit lower
    paired = paired_difference(a, b)
    assert paired["mean"] == pytest.approx(np.mean(a - b))
    assert above_zero(paired)
    unpaired_half = (mean_interval(a)["high"] - mean_interval(a)["low"]) / 2
    assert (paired["high"] - paired["low"]) / 2 < unpaired_half / 10


@pytest.mark.parametrize("values, message", [([], "at least one"), ([1.0, np.nan], "finite")])
def test_bad_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        mean_interval(values)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])


# --- the small tier of every claim, through the command line --------------------------------------


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """Every implemented claim's small tier, one seed (two for C2, the fastest, to show intervals)."""
    out = tmp_path_factory.mktemp("reproduce")
    for name in CLAIMS:
        seeds = "2" if name == "C2" else "1"
        assert cli.main(["reproduce", name, "--tier", "small", "--seeds", seeds, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", list(CLAIMS))
def test_small_tier_writes_consistent_json_and_a_figure(small_runs, name):
    claim = CLAIMS[name]
    folder = small_runs / name / "small"
    summary = json.loads((folder / "summary.json").read_text())
    seeds = summary["seeds"]
    assert summary["claim"] == name and summary["tier"] == "small"
    assert summary["verdict"]["verdict"] in VERDICTS and summary["verdict"]["reason"]
    assert set(summary["environment"]["versions"]) >= {"ponder", "numpy", "scipy", "matplotlib", "python"}
    assert list(summary["settings"]) == [s["name"] for s in claim.settings("small")]
    for setting in claim.settings("small"):
        runs = [json.loads(run_path(small_runs, name, "small", setting["name"], k).read_text()) for k in range(seeds)]
        for k, run in enumerate(runs):
            assert run["seed"] == k and run["settings"] == setting and run["seconds"] > 0
            assert run["environment"]["cpu_count"] and run["backend"] and run["blas_threads"] == 1
            assert all(np.isfinite(v) for v in run["numbers"].values())
        numbers = summary["settings"][setting["name"]]["numbers"]
        assert numbers, "no number was aggregated"
        for metric, interval in numbers.items():  # the summary is the runs' numbers, aggregated
            values = [run["numbers"][metric] for run in runs]
            assert interval["values"] == values
            assert interval["mean"] == pytest.approx(np.mean(values))
            assert (interval["low"] is None) == (seeds == 1)
    figure = folder / summary["figure"]
    assert figure.read_bytes()[:8] == PNG_MAGIC and figure.stat().st_size > 5000
    assert not list(folder.rglob("*.tmp")), "a temporary file of an atomic write was left behind"


def test_c2_numbers_are_consistent_speedups(small_runs):
    summary = json.loads((small_runs / "C2" / "small" / "summary.json").read_text())
    (entry,) = summary["settings"].values()
    for rate in entry["settings"]["rates"]:
        key = f"r{rate:g}"
        for k in range(summary["seeds"]):
            measured = entry["numbers"][f"measured_speedup_{key}"]["values"][k]
            theory = entry["numbers"][f"theoretical_speedup_{key}"]["values"][k]
            assert entry["numbers"][f"ratio_{key}"]["values"][k] == pytest.approx(measured / theory)
            assert theory >= 1 / (1 - rate) - 0.2  # the grid mask realises about the rate asked for


# --- resuming -------------------------------------------------------------------------------------


def _counting_claim(calls, value=lambda seed: float(seed)):
    def run(setting, seed, echo):
        calls.append((setting["name"], seed))
        return {"numbers": {"x": value(seed) + setting["offset"]}, "backend": "none"}

    def verdict(summary):
        return Verdict("partly", "a test claim")

    def plot(summary, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG_MAGIC)

    settings = [{"name": "a", "offset": 0.0}, {"name": "b", "offset": 10.0}]
    return Claim(name="fake", title="t", statement="s", source="src", tiers={"small": settings, "medium": settings,
                 "full": settings}, default_seeds={"small": 1, "medium": 3, "full": 3}, run=run, verdict=verdict,
                 plot=plot)


def test_resume_runs_only_what_is_missing(tmp_path):
    calls = []
    claim = _counting_claim(calls)
    run_claim(claim, "small", 2, tmp_path, echo=lambda line: None)
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    first = run_path(tmp_path, "fake", "small", "a", 0)
    stamp, text = first.stat().st_mtime_ns, first.read_text()
    calls.clear()
    lines = []
    summary = run_claim(claim, "small", 3, tmp_path, echo=lines.append)
    assert calls == [("a", 2), ("b", 2)]  # seeds 0 and 1 were finished
    assert first.stat().st_mtime_ns == stamp and first.read_text() == text
    assert sum("finished before, skipped" in line for line in lines) == 4
    assert summary["settings"]["b"]["numbers"]["x"]["values"] == [10.0, 11.0, 12.0]  # recomputed from all files
    assert len(summary["ran"]) == 2 and len(summary["skipped"]) == 4


def test_cli_resume_does_not_rewrite_a_finished_run(tmp_path, capsys):
    args = ["reproduce", "C2", "--tier", "small", "--out", str(tmp_path)]
    assert cli.main(args + ["--seeds", "1"]) == 0
    first = run_path(tmp_path, "C2", "small", "tiny", 0)
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args + ["--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] C2 small tiny seed 0: finished before, skipped" in out
    assert "[2/2] C2 small tiny seed 1: running" in out
    assert first.stat().st_mtime_ns == stamp
    assert run_path(tmp_path, "C2", "small", "tiny", 1).is_file()


def test_run_files_get_the_permissions_of_any_new_file(tmp_path):
    run_claim(_counting_claim([]), "small", 1, tmp_path, echo=lambda line: None)
    ordinary = tmp_path / "ordinary.json"
    ordinary.write_text("{}")
    for path in (run_path(tmp_path, "fake", "small", "a", 0), tmp_path / "fake" / "small" / "summary.json"):
        assert path.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777


def test_a_run_file_of_other_settings_is_an_error_not_mixed_in(tmp_path):
    calls = []
    claim = _counting_claim(calls)
    run_claim(claim, "small", 1, tmp_path, echo=lambda line: None)
    path = run_path(tmp_path, "fake", "small", "a", 0)
    record = json.loads(path.read_text())
    record["settings"]["offset"] = 5.0
    path.write_text(json.dumps(record))
    with pytest.raises(ReproductionError, match="other settings"):
        run_claim(claim, "small", 1, tmp_path, echo=lambda line: None)


def test_the_runner_refuses_too_few_seeds_for_a_tier(tmp_path):
    claim = _counting_claim([])
    with pytest.raises(ReproductionError, match="at least 3 seeds"):
        run_claim(claim, "medium", 2, tmp_path, echo=lambda line: None)
    with pytest.raises(ReproductionError, match="integer >= 1"):
        run_claim(claim, "small", 0, tmp_path, echo=lambda line: None)


def test_runs_in_worker_processes_give_the_numbers_of_runs_in_this_process(tmp_path, capsys):
    # the runs are seeded, so where they run must not change a number (only the run times)
    args = ["reproduce", "sanity", "--tier", "small", "--seeds", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "serial")]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "run(s) in 2 processes" in out
    serial, parallel = (json.loads((tmp_path / name / "sanity" / "small" / "summary.json").read_text())
                        for name in ("serial", "parallel"))
    assert len(parallel["ran"]) == len(serial["ran"]) == 2 * len(serial["settings"])
    for name, entry in serial["settings"].items():
        untimed = {metric for metric in entry["numbers"] if not metric.endswith("seconds")}
        assert "test_accuracy" in untimed
        for metric in untimed:
            assert parallel["settings"][name]["numbers"][metric] == entry["numbers"][metric]
    assert parallel["verdict"] == serial["verdict"]


def test_a_run_limits_the_compiled_kernels_threads_and_restores_them(tmp_path, monkeypatch):
    pytest.importorskip("fastpath._cython_unit")
    from refimpl.backend import get_backend

    monkeypatch.delenv("PONDER_THREADS", raising=False)
    cython = get_backend("cython")
    monkeypatch.setattr(cython, "threads", 3)
    seen = []

    def run(setting, seed, echo):
        seen.append((get_backend("cython").threads, os.environ.get("PONDER_THREADS")))
        return {"numbers": {"x": 1.0}, "backend": "cython"}

    claim = _counting_claim([])
    claim = Claim(name="fake", title="t", statement="s", source="src", tiers=claim.tiers,
                  default_seeds=claim.default_seeds, run=run, verdict=claim.verdict, plot=claim.plot)
    run_claim(claim, "small", 1, tmp_path, echo=lambda line: None)
    assert seen == [(1, "1"), (1, "1")]  # one thread, as for BLAS
    assert cython.threads == 3 and "PONDER_THREADS" not in os.environ
    record = json.loads(run_path(tmp_path, "fake", "small", "a", 0).read_text())
    assert record["blas_threads"] == record["compiled_threads"] == 1


def test_the_runner_refuses_a_bad_number_of_jobs(tmp_path):
    with pytest.raises(ReproductionError, match="jobs must be an integer >= 1, got 0"):
        run_claim(_counting_claim([]), "small", 1, tmp_path, echo=lambda line: None, jobs=0)


# --- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["C99", "--out", "x"], "argument CLAIM: must be one of"),
    (["C3", "--tier", "huge", "--out", "x"], "argument --tier: invalid choice: 'huge'"),
    (["C3", "--seeds", "0", "--out", "x"], "argument --seeds: must be an integer >= 1, got '0'"),
    (["C3", "--tier", "medium", "--seeds", "2", "--out", "x"], "the medium tier needs at least 3 seeds"),
    (["C3", "--jobs", "0", "--out", "x"], "argument --jobs: must be an integer >= 1, got '0'"),
    (["C3"], "--out is required"),
    (["--out", "x"], "CLAIM is required"),
])
def test_bad_arguments_give_one_clear_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageExit) as exc:
        cli.main(["reproduce", *args])
    assert exc.value.code == 2
    assert message in str(exc.value)
    assert not (tmp_path / "x").exists()  # refused before anything ran


@pytest.fixture
def planned_claim(monkeypatch):
    """A claim listed as planned but not written (every claim of the thesis is implemented now)."""
    monkeypatch.setitem(registry.PLANNED, "C10", "a claim nobody wrote")
    return "C10"


def test_a_planned_claim_is_refused_as_not_implemented_yet(planned_claim, tmp_path):
    with pytest.raises(UsageExit, match="claim C10 \\(a claim nobody wrote\\) is not implemented yet; implemented: sanity"):
        cli.main(["reproduce", planned_claim, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        registry.get_claim(planned_claim)


def test_list_names_every_claim_and_what_is_not_implemented(planned_claim, capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    implemented, planned = capsys.readouterr().out.split("not implemented yet:")
    assert all(f"  {name} " in implemented for name in CLAIMS) and planned_claim not in implemented
    assert "C10" in planned and "a claim nobody wrote" in planned


# --- verdicts from numbers ------------------------------------------------------------------------


def _summary(settings_numbers):
    return {"settings": {name: {"numbers": {m: mean_interval(v) for m, v in numbers.items()}}
                         for name, numbers in settings_numbers.items()}}


@pytest.mark.parametrize("deep, verdict", [
    ([0.80, 0.86, 0.93], "reproduced"),   # always 0.05-0.06 better than shallow
    ([0.70, 0.75, 0.80], "not reproduced"),
    ([0.76, 0.86, 0.89], "partly"),       # better on average, interval includes 0
])
def test_sanity_verdict_follows_the_paired_difference(deep, verdict):
    shallow = [0.75, 0.80, 0.88]
    result = CLAIMS["sanity"].verdict(_summary({"resnet8": {"test_accuracy": shallow},
                                                "resnet14": {"test_accuracy": deep}}))
    assert result.verdict == verdict
    gain = result.comparisons["resnet14_minus_resnet8_accuracy"]
    assert gain["mean"] == pytest.approx(np.mean(np.subtract(deep, shallow)))
    assert f"{gain['mean']:+.4f}" in result.reason


@pytest.mark.parametrize("grid, impact, verdict", [
    ([0.05, 0.06, 0.07], [0.10, 0.11, 0.12], "reproduced"),
    ([0.05, 0.06, 0.07], [-0.10, -0.11, -0.12], "partly"),
    ([-0.05, -0.06, -0.07], [-0.10, -0.11, -0.12], "not reproduced"),
])
def test_c3_verdict_follows_the_gains(grid, impact, verdict):
    result = CLAIMS["C3"].verdict(_summary({"nin-conv2": {"mean_gain_grid": grid, "mean_gain_impact": impact}}))
    assert result.verdict == verdict
    for kind, gains in (("grid", grid), ("impact", impact)):
        # the reason names the difference and its sign, not "lowers the error by -0.06"
        assert f"error(uniform) - error({kind}) = {np.mean(gains):+.4f}" in result.reason
        assert f"{kind} {'lower' if np.mean(gains) > 0 else 'not lower'} on average" in result.reason


def _collapse_summary(collapsed):
    """The five parity-collapse variants, three seeds; ``collapsed`` maps a variant to its per-seed flags."""
    def numbers(flags):
        accuracy = [0.6 if flag else 0.99 for flag in flags]
        steps = [1.0 if flag else 3.0 for flag in flags]
        return {"collapsed": [float(f) for f in flags], "accuracy": accuracy, "mean_ponder_steps": steps}
    return _summary({name: numbers(collapsed.get(name, [0, 0, 0]))
                     for name in ("relaxed", "no-cost", "warmer", "late-start", "late-start-no-cost")})


@pytest.mark.parametrize("collapsed, verdict", [
    ({"relaxed": [1, 1, 0], "no-cost": [1, 0, 0]}, "reproduced"),                   # warmer learns everywhere
    ({"relaxed": [1, 1, 0], "no-cost": [0, 0, 0]}, "partly"),                       # the cost is needed
    ({"relaxed": [1, 1, 0], "no-cost": [1, 0, 0], "warmer": [0, 1, 0]}, "partly"),  # warmer does not help
    ({"relaxed": [0, 0, 0], "no-cost": [1, 0, 0]}, "not reproduced"),               # nothing to explain
])
def test_parity_collapse_verdict_follows_which_variants_collapse(collapsed, verdict):
    from refimpl.reproduce.claim_collapse import LEARNED, ONE_STEP

    assert 0.6 < LEARNED < 0.99 and 1.0 < ONE_STEP < 3.0  # the synthetic runs sit on either side
    result = CLAIMS["parity-collapse"].verdict(_collapse_summary(collapsed))
    assert result.verdict == verdict
    assert f"relaxed: collapsed in {sum(collapsed['relaxed'])} of 3 seeds" in result.reason


def _c6_summary(sact_accuracy):
    """Three seeds, one canvas: ResNet-8 (1 MFLOP) and ResNet-14 (2 MFLOPs), SACT at 1.5 MFLOPs."""
    def entry(kind, flops, accuracy):
        return {"settings": {"canvas": 32, "kind": kind},
                "numbers": {"mflops_per_image": mean_interval(flops), "test_accuracy": mean_interval(accuracy)}}
    return {"settings": {"resnet8-c32": entry("resnet", [1.0, 1.0, 1.0], [0.60, 0.70, 0.65]),
                         "resnet14-c32": entry("resnet", [2.0, 2.0, 2.0], [0.80, 0.90, 0.85]),
                         "sact-tau0.1-c32": entry("sact", [1.5, 1.5, 1.5], sact_accuracy)}}


def test_c6_compares_with_the_plain_curve_at_equal_flops():
    from refimpl.reproduce.claim_flops import gains_over_plain_curve

    # the plain curve at 1.5 MFLOPs is 0.70, 0.80, 0.75 for the three seeds (halfway between the depths)
    gains = gains_over_plain_curve(_c6_summary([0.75, 0.84, 0.80]))
    assert gains["sact-tau0.1-c32"]["values"] == pytest.approx([0.05, 0.04, 0.05])
    assert CLAIMS["C6"].verdict(_c6_summary([0.75, 0.84, 0.80])).verdict == "reproduced"
    assert CLAIMS["C6"].verdict(_c6_summary([0.60, 0.71, 0.66])).verdict == "not reproduced"


@pytest.mark.parametrize("claim_name", ["C8", "C9"])
def test_pact_claims_use_networks_that_can_halt(claim_name):
    # PACT-ResNet-8 has one residual unit per stage, hence no halting head: its relaxed, discrete and
    # thresholded modes are one network, and C8's gaps came out exactly 0 on every seed.
    from refimpl.models import build_model
    from refimpl.reproduce.claim_pact import _pact_options

    claim = CLAIMS[claim_name]
    for tier in claim.tiers:
        for setting in claim.settings(tier):
            model = build_model(setting["model"], 10, 1, np.random.default_rng(0),
                                **_pact_options(setting, "relaxed"))
            assert all(len(stage.heads) >= 1 for stage in model.stages), (tier, setting["name"])


def test_verdict_refuses_an_unknown_word():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("sort of", "because")


# --- the results page -----------------------------------------------------------------------------


def test_results_page_says_not_yet_run_for_every_claim_without_json(tmp_path, planned_claim):
    text = results_markdown(tmp_path / "nothing", tier="medium")
    for name in CLAIMS:
        section = text.split(f"### {name}:")[1].split("###")[0]
        assert "medium tier not yet run" in section
        assert "Verdict" not in section
    assert f"### {planned_claim}: not implemented yet" in text


def test_results_page_shows_the_numbers_of_a_committed_summary(small_runs):
    text = results_markdown(small_runs, tier="small", figure_prefix="/figs")
    summary = json.loads((small_runs / "C3" / "small" / "summary.json").read_text())
    section = text.split("### C3:")[1].split("###")[0]
    assert f"**Verdict: {summary['verdict']['verdict']}.**" in section
    dense = summary["settings"]["nin-conv2"]["numbers"]["dense_error"]["mean"]
    assert f"| dense_error | {dense:.4g} |" in section
    assert "(/figs/C3/small/C3.png)" in section
    assert "not yet run" not in section


# --- the committed results ------------------------------------------------------------------------

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "_static" / "reproduce"


def test_the_results_page_counts_the_runs_of_each_machine(tmp_path):
    from refimpl.reproduce.runner import run_machines

    records = [{"environment": {"machine": "x86_64", "processor": "", "cpu_count": cpus}} for cpus in (2, 16, 16)]
    assert run_machines(records) == {"x86_64 with 16 CPUs": 2, "x86_64 with 2 CPUs": 1}
    summary = run_claim(_counting_claim([]), "small", 2, tmp_path, echo=lambda line: None)
    assert sum(summary["run_machines"].values()) == 4  # two settings, two seeds


@pytest.mark.parametrize("summary_path", sorted(COMMITTED.glob("*/*/summary.json")),
                         ids=lambda p: f"{p.parent.parent.name}-{p.parent.name}")
def test_committed_summary_is_its_run_files_aggregated(summary_path):
    from refimpl.reproduce.runner import aggregate

    summary = json.loads(summary_path.read_text())
    claim, tier = CLAIMS[summary["claim"]], summary["tier"]
    settings = claim.settings(tier)
    assert [s["name"] for s in settings] == list(summary["settings"]), "the tier's settings changed since the run"
    records = {(s["name"], k): json.loads(run_path(COMMITTED, claim.name, tier, s["name"], k).read_text())
               for s in settings for k in range(summary["seeds"])}
    assert all(r["settings"] == s for s in settings for (name, _), r in records.items() if name == s["name"])
    again = aggregate(claim, tier, settings, summary["seeds"], records)
    assert again["settings"].keys() == summary["settings"].keys()
    for name, entry in again["settings"].items():
        for metric, interval in entry["numbers"].items():
            stored = summary["settings"][name]["numbers"][metric]
            assert stored["values"] == interval["values"]
            assert stored["mean"] == pytest.approx(interval["mean"])
    assert again["verdict"] == summary["verdict"]
    if "run_machines" in summary:  # written since summaries count the runs per machine
        assert again["run_machines"] == summary["run_machines"]
    assert (summary_path.parent / summary["figure"]).read_bytes()[:8] == PNG_MAGIC
