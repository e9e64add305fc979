"""fisedit-compiler: compile any diffusers U-Net into an incremental engine for image editing.

    import fisedit_compiler as fc
    unet = fc.zoo.unet("sd15")
    engine = fc.compile(unet, fc.SparseConfig())
    cache = engine.new_cache(num_steps=1)
    y = engine.record(cache, step=0, **inputs)
    y2 = engine.edit(cache, step=0, plan=engine.plan(mask), **edited_inputs)

Or through a stock pipeline, with the torch.compile backend "fisedit":

    pipe.unet = torch.compile(pipe.unet, backend="fisedit")
    with fc.recording(pipe.unet) as rec:
        pipe(prompt, generator=torch.Generator().manual_seed(0))
    with fc.editing(rec, mask):
        pipe(new_prompt, generator=torch.Generator().manual_seed(0))
"""

from . import zoo
from .backend import (Editing, Recording, UnsupportedGraphWarning, editing, fisedit_backend,
                      recording)
from .compiler import oracle
from .config import SparseConfig
from .edit_flow import EditResult, EditSession
from .engine.engine import EditCache, SparseEngine
from .errors import FiseditError, UnsupportedGraphError
from .execution.plan import MaskPlan


def compile(unet, config: SparseConfig | None = None) -> SparseEngine:  # noqa: A001 - public API
    """Compile ``unet`` (a diffusers UNet2DConditionModel or UNet2DModel) into a SparseEngine.

    Compilation is lazy: the graph is captured on the first call for each input signature.
    """
    return SparseEngine(unet, config)


__all__ = ["compile", "SparseConfig", "SparseEngine", "EditCache", "MaskPlan", "EditSession",
           "EditResult", "recording", "editing", "Recording", "Editing", "fisedit_backend",
           "FiseditError", "UnsupportedGraphError", "UnsupportedGraphWarning", "oracle", "zoo"]
