"""FISEdit-style editing sessions over stock diffusers pipelines (DESIGN section 4)."""

from .session import EditResult, EditSession

__all__ = ["EditSession", "EditResult"]
