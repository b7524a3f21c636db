"""Checkpoints in and out: `load(path)` is the one loader of torchbook.

It reads run folders (`runs/<recipe>/<id>/`), saved model folders (`model.safetensors` + `config.json` written by
`torchbook.models.save_model`, or `model.joblib` for scikit-learn recipes) and Hugging Face folders of the
decoder-only families `torchbook.models.gpt` supports, and GGUF files (`torchbook.models.gguf`). Later: Hub ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchbook.errors import CheckpointError

TOKENIZER = "tokenizer.json"


@dataclass
class Loaded:
    """What `load` gives back: the model, its tokenizer (or None), and where it came from."""

    model: Any
    tokenizer: Any = None
    recipe: str | None = None
    path: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # `model, tokenizer = torchbook.load(...)`
        return iter((self.model, self.tokenizer))


def load_tokenizer(folder: Path) -> Any:
    path = folder / TOKENIZER
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{str(path)!r} is corrupt ({e})") from None


def load_model_folder(folder: Path, map_location: str = "cpu") -> Loaded:
    from torchbook.models import CONFIG, load_estimator, load_model

    config_path = folder / CONFIG
    if not config_path.exists():
        raise CheckpointError(f"{str(folder)!r} holds no model ({CONFIG} is missing)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{str(config_path)!r} is corrupt (not valid JSON)") from None
    if meta.get("torchbook_class") == "sklearn":
        model = load_estimator(folder)
    else:
        model = load_model(folder, map_location=map_location)
    return Loaded(model=model, tokenizer=load_tokenizer(folder), path=folder, meta=meta)


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face folder: its config.json names a `model_type` (ours names a `torchbook_class`)."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load(path: str | Path, map_location: str = "cpu") -> Loaded:
    """A ready model (eval mode) and tokenizer from a run folder or a model folder; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (runs/<recipe>/<id>) or a model folder")
    if path.is_dir() and (path / "model").is_dir():
        from torchbook.runs import RunDir

        run = RunDir.open(path)
        loaded = load_model_folder(run.model_dir, map_location)
        loaded.recipe, loaded.path, loaded.run_config = run.recipe, path, run.config_values()
        return loaded
    if path.is_file() and path.suffix == ".gguf":
        from torchbook.models.gguf import load_gguf

        model, tokenizer, info = load_gguf(path)
        return Loaded(model=model, tokenizer=tokenizer, path=path, meta={"format": "gguf", **info})
    if path.is_dir() and _is_hf_folder(path):
        from torchbook.models.gpt import load_hf_folder

        return Loaded(model=load_hf_folder(path), tokenizer=load_tokenizer(path), path=path,
                      meta={"format": "huggingface"})
    if path.is_dir():
        return load_model_folder(path, map_location)
    raise CheckpointError(
        f"cannot load {str(path)!r}: accepted are a run folder or a saved model folder "
        "(model.safetensors + config.json)"
    )
