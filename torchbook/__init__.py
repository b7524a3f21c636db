"""torchbook: every system of *Hands-On Machine Learning with Scikit-Learn and PyTorch*, as runnable software.

`torchbook.load(path)` gives back a ready model (and tokenizer) from any run folder; recipes run from Python
with `torchbook.recipes.<module>.run(config, run_dir)` or from the `torchbook` command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from torchbook.hub import Loaded


def load(path: Any, **kwargs: Any) -> Loaded:
    """Load a model (and its tokenizer) from a run folder or a saved model folder. See `torchbook.hub.load`."""
    from torchbook.hub import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
