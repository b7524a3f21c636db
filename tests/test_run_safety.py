"""What a new user ran into (issue #28): nothing saved is lost, corrupt models are refused, finished and failed runs
say so, written files follow the umask. Each test reproduces the reported case."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import torchbook
from torchbook.cli import main
from torchbook.errors import CheckpointError, RunExists, RunFinished
from torchbook.hub import load_model, save_estimator, save_model
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.runs import RunDir

SMOKE = ["run", "image-classifier", "--preset", "smoke", "data=digits"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "X"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("hi")
    for extra in ([], ["--overwrite"]):
        code, out = run_cli(capsys, *SMOKE, "--run-dir", str(folder), *extra)
        assert code == 2 and "not a torchbook run folder" in out and "Traceback" not in out
        assert (folder / "thesis.txt").read_text() == "hi" and (folder / "sub").is_dir()
    with pytest.raises(RunExists):
        RunDir.start(folder, "image-classifier", {"a": 1}, overwrite=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main([*SMOKE, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_finished_run_resumed_changes_nothing(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = finished_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, out = run_cli(capsys, "run", "image-classifier", "--resume", str(run_dir))
    assert code == 0 and "finished run" in out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    config = RunDir.open(run_dir).config_values()
    with pytest.raises(RunFinished):  # from Python too: the same folder and config is not run again
        RunDir.start(run_dir, "image-classifier", config)
    # --overwrite replaces a run (it is one): a copy of it, here
    copy = run_dir.parent / "copy"
    copy.mkdir()
    (copy / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    (copy / "report.md").write_text("old")
    RunDir.start(copy, "image-classifier", config, overwrite=True)
    assert not (copy / "report.md").exists()


def test_corrupt_saved_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = MLP(MLPConfig(4, 2, [8]))
    save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-40:] = bytes(40)  # damage the tensor data, not the header: safetensors itself would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.* is corrupt"):
        load_model(tmp_path / "m")
    save_estimator({"an": "estimator"}, tmp_path / "e")
    (tmp_path / "e" / "model.joblib").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.joblib.* is corrupt"):
        torchbook.load(tmp_path / "e")


def test_a_run_that_fails_at_start_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (["lr=nan"], ["device=cuda:7"]):  # refused before any folder is made
        run_dir = tmp_path / bad[0].split("=")[0]
        code, out = run_cli(capsys, *SMOKE, *bad, "--run-dir", str(run_dir))
        assert code == 2 and not run_dir.exists() and "Traceback" not in out
    # Offline without the data: the folder says why it failed, and `report` repeats it instead of advising --resume.
    monkeypatch.setattr("torchbook.data.images.DEBIAN_FASHION_DIR", tmp_path / "absent")
    monkeypatch.setenv("TORCHBOOK_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.setenv("TORCHBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torchbook.data.download.fetch.__defaults__", (0.5,))
    run_dir = tmp_path / "offline"
    code, out = run_cli(capsys, "run", "image-classifier", "--preset", "smoke", "data=fashion-mnist",
                        "--run-dir", str(run_dir))
    assert code == 2 and "Traceback" not in out
    code, out = run_cli(capsys, "report", str(run_dir))
    assert code == 2 and "failed:" in out and "download" in out


def test_written_files_follow_the_umask(finished_run: Path) -> None:
    run_dir = finished_run
    expected = 0o666 & ~_umask()
    for name in ("config.json", "report.md", "model/model.safetensors", "model/config.json", "metrics.jsonl"):
        assert stat.S_IMODE(os.stat(run_dir / name).st_mode) == expected, name
    assert json.loads((run_dir / "model" / "config.json").read_text())["sha256"]["model.safetensors"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
