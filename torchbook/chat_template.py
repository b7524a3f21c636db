"""Chat templates: moved to `torchbook.hub.prompts` (kept importable here)."""

from torchbook.hub.prompts import DEFAULT_TEMPLATE, TemplateError, render_chat

__all__ = ["DEFAULT_TEMPLATE", "TemplateError", "render_chat"]
