"""Every command, with each class of bad input, answers with one line and exit code 2, never a traceback (issue
#28): a missing path, the wrong kind of run, a bad value, an unreadable file, a destination that cannot be written.
Arguments are checked before anything slow (a model load, a dataset) happens."""

from __future__ import annotations

import errno
import io
import json
import sys
from pathlib import Path

import pytest

from torchbook.cli import main
from torchbook.runs import RunDir


def fake_run(root: Path, recipe: str) -> Path:
    """A run folder of `recipe` (config.json only): enough for the checks that come before loading anything."""
    folder = root / recipe
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"recipe": recipe, "config": {}}))
    (folder / "model").mkdir()
    return folder


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    binary = root / "binary.json"
    binary.write_bytes(b"\x00\x01\xff\xfe")
    header_only = root / "header.csv"
    header_only.write_text("longitude,latitude,housing_median_age,total_rooms,total_bedrooms,population,households,"
                           "median_income,ocean_proximity\n")
    moon = root / "moon.csv"
    moon.write_text(header_only.read_text() + "-122,37,41,880,129,322,126,8.3,ON THE MOON\n")
    not_a_run = root / "plain"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine")
    return {"missing": str(root / "nowhere"), "binary": str(binary), "header_only": str(header_only),
            "moon": str(moon), "not_a_run": str(not_a_run),
            **{name: str(fake_run(root, name)) for name in ("char-rnn", "housing", "ridership", "translator")}}


CASES = [
    # (command line with {placeholders}, what the one line must say)
    ("run nope", "unknown recipe 'nope'"),
    ("run image-classifier lr=nan", "lr=nan is not a finite number"),
    ("run image-classifier device=cuda:9", "device 'cuda:9'"),
    ("run image-classifier epochs=two", "epochs"),
    ("run image-classifier --config {binary}", "is not text"),
    ("run image-classifier --config {missing}", "does not exist"),
    ("run image-classifier --resume {missing}", "does not exist"),
    ("run image-classifier --resume {char-rnn}", "is a run of 'char-rnn'"),
    ("run image-classifier --preset smoke --run-dir {not_a_run}", "not a torchbook run folder"),
    ("run image-classifier --preset smoke --run-dir /proc/torchbook-run", "/proc/torchbook-run"),
    ("report {missing}", "does not exist"),
    ("report {not_a_run}", "not a torchbook run folder"),
    ("eval {missing}", "does not exist"),
    ("eval {housing} --device cuda:9", "--device: device 'cuda:9'"),
    ("translate {missing} hi", "does not exist"),
    ("translate {char-rnn} hi", "is a char-rnn run; translating needs a run of translator or translator-rnn"),
    ("translate {translator} hi --beam 0", "--beam 0 must be at least 1"),
    ("forecast {housing}", "is a housing run; forecasting needs a run of ridership"),
    ("forecast {ridership} --days 100000", "--days: days=100000 must be between 1 and 366"),
    ("forecast {ridership} --end yesterday", "--end: the end date 'yesterday' is not a date"),
    ("predict {missing} {header_only}", "does not exist"),
    ("predict {housing} {missing}.csv", "does not exist"),
    ("predict {housing} {header_only}", "has a header but no rows"),
    ("predict {housing} {moon}", "unknown value(s) 'ON THE MOON'"),
    ("predict {char-rnn} {header_only}", "does not predict from CSV files"),
    ("play {missing}", "does not exist"),
    ("generate --max-new-tokens 0 --chat hi", "--max-new-tokens 0 must be at least 1"),
    ("generate --temperature -1 --chat hi", "temperature must be >= 0"),
    ("generate {missing} hello", "does not exist"),
    ("generate --chat {empty}", "the prompt is empty"),
    ("index {missing}", "no such file or folder; give files or folders to index"),
    ("search {empty}", "the query is empty"),
    ("tune nope --trials 2 lr=loguniform(1e-4,1e-1)", "unknown recipe 'nope'"),
    ("tune image-classifier --trials 0 lr=loguniform(1e-4,1e-1)", "--trials: the number of trials must be at least 1"),
]


@pytest.mark.parametrize(("line", "expected"), CASES, ids=[c[0].split(" {")[0][:40] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(line: str, expected: str, places: dict[str, str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = [word.format(**places, empty="") if "{" in word else word for word in line.split(" ")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("torchbook: error:") == 1, err
    assert expected in err, err


@pytest.mark.parametrize("command", [["translate", "{translator}"], ["generate", "--chat"]])
def test_non_utf8_input_on_stdin_is_one_line(command: list[str], places: dict[str, str],
                                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\n"), encoding="utf-8"))
    code = main([word.format(**places) for word in command])
    err = capsys.readouterr().err
    assert code == 2 and "not valid UTF-8" in err and "Traceback" not in err


def test_a_full_disk_is_one_line_and_corrupts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir.start(tmp_path / "run", "image-classifier", {"a": 1})
    before = (run.path / "config.json").read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torchbook.io.os.fsync", full)
    code = main(["run", "image-classifier", "--preset", "smoke", "--run-dir", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert (run.path / "config.json").read_bytes() == before  # the earlier file is intact
    assert not [p for p in (tmp_path / "other").glob(".*.tmp")]  # no temporary file left behind
