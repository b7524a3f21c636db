"""Checkpoints in and out, in one place: `load()` for every format, torchbook's model folders, Hugging Face
folders (`hf`), GGUF files (`gguf`), and chat prompts (`prompts`: a checkpoint's template, special and end tokens).

- `load(path)` -> `Loaded(model, tokenizer, recipe, path, run_config, meta)` (see `torchbook.hub.loading`).
- `save_model` / `load_model`: a torchbook model as `model.safetensors` + `config.json`; `save_estimator` /
  `load_estimator` for scikit-learn recipes; `save_hf`: a Hugging Face folder `transformers` loads.
- `register_architecture(model_type, loader)`: a new Hugging Face family is one entry.
"""

from torchbook.hub.folders import load_estimator, load_model, load_tokenizer, save_estimator, save_model
from torchbook.hub.gguf import default_chat_model
from torchbook.hub.hf import save_hf
from torchbook.hub.loading import ARCHITECTURES, HUB_ID, Loaded, load, register_architecture

__all__ = ["ARCHITECTURES", "HUB_ID", "Loaded", "default_chat_model", "load", "load_estimator", "load_model",
           "load_tokenizer", "register_architecture", "save_estimator", "save_hf", "save_model"]
