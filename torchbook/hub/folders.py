"""torchbook's own model folders: `model.safetensors` + `config.json` (the model's family module, class and
config), or `model.joblib` for scikit-learn estimators. `load_model` imports only classes inside the `torchbook`
package named by a config file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from torch import nn

from torchbook.config import to_dict
from torchbook.data.download import sha256_of
from torchbook.data.tokenizers import TOKENIZER
from torchbook.errors import CheckpointError
from torchbook.hub.state import load_state
from torchbook.io import atomic_write, atomic_write_json
from torchbook.nn.quantized import check_savable

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ESTIMATOR = "model.joblib"


def save_model(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's weights (safetensors) and its config, so `load_model(folder)` rebuilds it."""
    check_savable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(model).__name__} has no dataclass `config`; torchbook models keep their config")
    # Tied weights share storage; safetensors wants each tensor once, so clone shared ones.
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        tensors[name] = tensor.detach().cpu().clone() if key in seen else tensor.detach().cpu().contiguous()
        seen.setdefault(key, name)
    payload = save(tensors)
    atomic_write(folder / WEIGHTS, lambda f: f.write(payload))
    atomic_write_json(
        folder / CONFIG,
        {
            "torchbook_class": f"{type(model).__module__}:{type(model).__qualname__}",
            "config": to_dict(config),
            "sha256": {WEIGHTS: hashlib.sha256(payload).hexdigest()},
            **(extra or {}),
        },
    )
    return folder


def verify_checksums(folder: Path, meta: dict[str, Any]) -> None:
    """Each file whose sha256 the folder's config.json records must still have it (a damaged model file would
    otherwise load and silently compute nonsense). Folders saved before checksums were recorded pass."""
    for name, expected in (meta.get("sha256") or {}).items():
        if sha256_of(folder / name) != expected:
            raise CheckpointError(f"{str(folder / name)!r} is corrupt: its sha256 is not the one recorded when it "
                                  "was saved (the file was changed or damaged); train the run again or restore it")


def model_class(spec: str) -> type[nn.Module]:
    module_name, _, qualname = spec.partition(":")
    if not module_name.startswith("torchbook."):
        raise CheckpointError(f"refusing to import model class {spec!r}: only torchbook's own classes are loaded")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise CheckpointError(f"model class {spec!r} named in the checkpoint does not exist in this torchbook") from None
    return obj  # type: ignore[no-any-return]


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_model`, in eval mode; a clear error for a missing or corrupt folder."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise CheckpointError(f"{str(path)!r} is missing: {str(folder)!r} is not a saved torchbook model")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{str(config_path)!r} is corrupt (not valid JSON)") from None
    verify_checksums(folder, meta)
    cls = model_class(meta["torchbook_class"])
    config_cls = cls.config_class  # type: ignore[attr-defined]
    model = cls(config_cls(**meta["config"]))
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(weights_path)!r} is corrupt or truncated ({e})") from None
    return load_state(model, state, repr(str(weights_path))).eval()


def save_estimator(estimator: Any, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a scikit-learn estimator or pipeline (Part I recipes) with joblib, atomically."""
    import joblib  # imports scikit-learn's world; only scikit-learn recipes need it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Compressed: a random forest's trees pickle to over 100 MB (every node of every tree), a quarter of that
    # compressed (a smoke run's forest: 1.76 MB raw, 0.42 MB compressed); prediction needs all of them.
    atomic_write(folder / ESTIMATOR, lambda f: joblib.dump(estimator, f, compress=("zlib", 3)))
    atomic_write_json(folder / CONFIG, {"torchbook_class": "sklearn", "sha256": {ESTIMATOR: sha256_of(folder / ESTIMATOR)},
                                        **(extra or {})})
    return folder


def load_estimator(folder: str | Path) -> Any:
    import joblib  # imports scikit-learn's world; only scikit-learn recipes need it

    path = Path(folder) / ESTIMATOR
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is missing: not a saved scikit-learn model")
    try:
        verify_checksums(Path(folder), json.loads((Path(folder) / CONFIG).read_text()))
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{str(Path(folder) / CONFIG)!r} is missing or corrupt (not valid JSON)") from None
    try:
        return joblib.load(path)
    except Exception as e:  # joblib raises many kinds on a damaged pickle
        raise CheckpointError(f"{str(path)!r} is corrupt or truncated ({type(e).__name__}: {e})") from None


def load_tokenizer(folder: Path) -> Any:
    """The `tokenizers.Tokenizer` saved beside a model (tokenizer.json), or None when there is none."""
    path = folder / TOKENIZER
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{str(path)!r} is corrupt ({e})") from None
