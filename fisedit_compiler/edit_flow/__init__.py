"""FISEdit-style editing sessions over stock diffusers pipelines (docs/design.md, "Editing flow")."""

from .session import EditResult, EditSession

__all__ = ["EditSession", "EditResult"]
