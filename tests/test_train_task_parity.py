"""``ponder train --task parity --objective act|pact|pondernet``: the parity trainer behind ``ponder train``."""

import json

import pytest

from refimpl.cli import main

TINY = ["--option", "size=3", "--option", "steps=20", "--option", "hidden=8", "--option", "max_steps=4",
        "--option", "eval_size=50"]


@pytest.mark.parametrize("objective", ["act", "pact", "pondernet"])
def test_train_task_parity_runs_the_parity_trainer(tmp_path, capsys, objective):
    out = tmp_path / objective
    assert main(["train", "--task", "parity", "--objective", objective, *TINY, "--batch-size", "16",
                 "--tau", "0.002", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rules = ["act"] if objective == "act" else ["thresholded", "sample"]
    for rule in rules:
        assert f"{rule:>12}: accuracy" in printed
    result = json.loads((out / "parity.json").read_text())
    settings = result["settings"]
    assert (settings["objective"], settings["size"], settings["steps"], settings["hidden"]) == (objective, 3, 20, 8)
    assert (settings["batch_size"], settings["tau"], settings["seed"]) == (16, 0.002, 3)
    assert settings["lr"] == 3e-3 and settings["temperature"] == 0.5  # `ponder parity` defaults where not given
    assert set(result["evaluation"]) == set(rules)
    assert len(result["log"]["task_loss"]) == 10


def test_train_task_parity_matches_ponder_parity(tmp_path, capsys):
    via_train, via_parity = tmp_path / "train", tmp_path / "parity.json"
    assert main(["train", "--task", "parity", "--objective", "pact", *TINY, "--batch-size", "16", "--lr", "0.01",
                 "--out", str(via_train)]) == 0
    assert main(["parity", "--objective", "pact", "--size", "3", "--steps", "20", "--hidden", "8", "--max-steps", "4",
                 "--eval-size", "50", "--batch-size", "16", "--lr", "0.01", "--out", str(via_parity)]) == 0
    capsys.readouterr()
    a, b = (json.loads(p.read_text()) for p in (via_train / "parity.json", via_parity))
    assert a["log"] == b["log"]
    assert a["evaluation"] == b["evaluation"]


@pytest.mark.parametrize("arguments, message", [
    (["--task", "parity", "--out", "x"], "needs --objective"),
    (["--task", "parity", "--objective", "act", "--model", "resnet8", "--out", "x"], "takes no --model"),
    (["--task", "parity", "--objective", "act", "--option", "widths=[4]", "--out", "x"],
     "--option widths does not apply to --task parity"),
    (["--task", "parity", "--objective", "act", "--option", "size=2.5", "--out", "x"], "size must be an int"),
    (["--task", "parity", "--objective", "act", "--option", "beta=high", "--out", "x"], "beta must be a number"),
    (["--model", "resnet8", "--objective", "act", "--data", "digits", "--out", "x"], "takes no --objective"),
    (["--data", "digits", "--out", "x"], "needs --model and --data"),
])
def test_train_task_errors(arguments, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", *arguments])


def test_parity_prints_its_log_while_training_and_warns_about_settings_known_not_to_learn(monkeypatch, capsys):
    from refimpl import parity
    from refimpl.commands.parity_experiment import ParitySettings, known_problems

    seen = []
    train = parity.train_parity

    def spy(*args, callback=None, **kwargs):
        def logged(step, rnn, log):
            seen.append((step, capsys.readouterr().out))  # what was printed by the time this interval ended
            callback(step, rnn, log)
        return train(*args, callback=logged, **kwargs)

    monkeypatch.setattr(parity, "train_parity", spy)
    assert main(["parity", "--objective", "act", "--size", "3", "--steps", "20", "--hidden", "8", "--max-steps", "4",
                 "--eval-size", "50"]) == 0
    # the line of interval k is printed before interval k + 1 ends, i.e. during training
    assert [step for step, _ in seen] == list(range(2, 21, 2))
    assert all(f"step {seen[k][0]:6d}" in seen[k + 1][1] for k in range(len(seen) - 1))
    assert known_problems(ParitySettings("act")) == []  # the defaults are not known to fail
    assert any("likely too few" in p for p in known_problems(ParitySettings("act", size=64, steps=2000)))
