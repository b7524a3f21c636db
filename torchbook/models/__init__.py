"""Models: one file per architecture family. A model is a plain `nn.Module` built from a config dataclass.

Every model class sets `config_class`, takes its config as the only constructor argument and keeps it as
`self.config`. Models know nothing of files, training or decoding loops: checkpoints in and out live in
`torchbook.hub` (`save_model`, `load_model`, Hugging Face and GGUF conversion).
"""
