"""fisedit-compiler: compile any diffusers U-Net into an incremental engine for image editing.

    import fisedit_compiler as fc
    unet = fc.zoo.unet("sd15")
    engine = fc.compile(unet, fc.SparseConfig())
    cache = engine.new_cache(num_steps=1)
    y = engine.record(cache, step=0, **inputs)
    y2 = engine.edit(cache, step=0, plan=engine.plan(mask), **edited_inputs)
"""

from . import oracle, zoo
from .config import SparseConfig
from .errors import FiseditError, UnsupportedGraphError
from .runtime.engine import EditCache, SparseEngine
from .runtime.plan import MaskPlan


def compile(unet, config: SparseConfig | None = None) -> SparseEngine:  # noqa: A001 - public API
    """Compile ``unet`` (a diffusers UNet2DConditionModel or UNet2DModel) into a SparseEngine.

    Compilation is lazy: the graph is captured on the first call for each input signature.
    """
    return SparseEngine(unet, config)


__all__ = ["compile", "SparseConfig", "SparseEngine", "EditCache", "MaskPlan", "FiseditError",
           "UnsupportedGraphError", "oracle", "zoo"]
