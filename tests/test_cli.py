"""The `torchbook` command: listing, running, and one clear line (exit 2, no traceback) for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchbook.cli import main


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchbook", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_list_shows_implemented_recipes_with_chapter(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "image-classifier" in out and "regression-mlp" in out and "ch 10" in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "image-clasifier"], "unknown recipe 'image-clasifier'; accepted: image-classifier"),
        (["run", "image-classifier", "lrr=0.1"], "unknown config key 'lrr'; accepted: lr"),
        (["run", "image-classifier", "epochs=two"], "epochs='two' is not int"),
        (["run", "image-classifier", "--preset", "fast"], "unknown preset 'fast'; accepted:"),
        (["run", "image-classifier", "--config", "nowhere.json"], "config file 'nowhere.json' does not exist"),
        (["run", "image-classifier", "--resume", "nowhere"], "run folder 'nowhere' does not exist"),
        (["report", "nowhere"], "run folder 'nowhere' does not exist"),
        (["eval", "."], "is not a torchbook run folder (no config.json)"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchbook: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1


def test_console_command_prints_one_line_without_traceback(tmp_path):
    result = cli("run", "image-clasifier", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "torchbook: error: unknown recipe 'image-clasifier'; accepted: " + result.stderr.split(
        "accepted: ")[1].strip()


def test_unknown_command_and_flag_exit_2(capsys):
    for args in (["trian"], ["run", "image-classifier", "--presett", "smoke"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "image-classifier", "--preset", "smoke", "epochs=1", "--run-dir", "r", "limit=100"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert (config["epochs"], config["limit"], config["data"]) == (1, 100, "digits")
    with pytest.raises(SystemExit):
        main(["run", "image-classifier", "--preset", "smoke", "--bogus"])


def test_malformed_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{oops")
    assert main(["run", "image-classifier", "--config", "bad.json"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_resume_refuses_another_recipes_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"recipe": "regression-mlp", "config": {}}))
    assert main(["run", "image-classifier", "--resume", str(run)]) == 2
    assert "is a run of 'regression-mlp', not 'image-classifier'" in capsys.readouterr().err


def test_resume_may_change_how_a_run_computes_but_not_what_it_learns(tmp_path, monkeypatch, capsys):
    """After running out of memory a run resumes with activation checkpointing on; its learning settings are fixed."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "image-classifier", "--preset", "smoke", "--run-dir", "r"]) == 0
    (tmp_path / "r" / "report.md").unlink()  # as if it had been killed before the end
    assert main(["run", "image-classifier", "--resume", "r", "lr=0.5", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "only device, num_workers, progress, compile, activation_checkpointing, release_memory may change" in err
    assert "drop lr=0.5" in err and "progress" not in err.split("drop")[1]
    assert main(["run", "image-classifier", "--resume", "r", "activation_checkpointing=true", "progress=false"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert config["activation_checkpointing"] is True and config["progress"] is False
    events = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert {"activation_checkpointing": True, "progress": False} in [e["changed"] for e in events if e["kind"] == "resume"]
    assert (tmp_path / "r" / "report.md").exists()
    # a run made before a config key existed (config.json without it) resumes, the key at its default
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    del record["config"]["tensorboard"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(record))
    (tmp_path / "r" / "report.md").unlink()
    assert main(["run", "image-classifier", "--resume", "r"]) == 0


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("list", "run", "report", "eval"):
        assert command in out


def test_run_recipe_help_lists_its_config_keys_and_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "breakout-ppo", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "total_steps" in out and "int" in out and "medium:" in out and "smoke:" in out
    assert "quick:" not in out  # breakout-ppo has no quick preset, and its help does not pretend it has


def test_threads_flag_sets_torchs_threads(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["list", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["list", "--threads", "0"]) == 2
        assert "--threads 0 must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_generate_words_may_follow_options(monkeypatch, capsys):
    """`torchbook generate MODEL --chat "question"`: the words after an option still reach the command."""
    seen = {}

    def fake_main(args):
        seen["words"] = args.words
        return 0

    import torchbook.cli.generate as generate_command

    monkeypatch.setattr(generate_command, "main", fake_main)
    assert main(["generate", "some/model", "--chat", "What is", "the capital?"]) == 0
    assert seen["words"] == ["some/model", "What is", "the capital?"]
