"""The "shapes" model: a small text-to-image pipeline trained on rendered scenes, with ground truth.

No pretrained weights can be downloaded here, and random weights cannot show that an edit lands
in the right place. This package renders scenes of coloured shapes from captions (``render``:
scenes, the caption grammar, prompt-edit pairs with the region that truly changes), builds a
complete StableDiffusionPipeline small enough to train from scratch in minutes (``model``),
trains it (``train``: ``python -m fisedit_compiler.shapes.train --out DIR --minutes M``), and
checks generated images against their captions (``checker``). The trained weights live in
``weights/`` (fp16, save_pretrained layout) and load with ``fc.zoo.pipeline("shapes")``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import pipeline_files
from ..errors import FiseditError

WEIGHTS = Path(__file__).resolve().parent / "weights"
# The demo's scene and edit (a colour change of one object; the other object and the
# background must stay as they are). 64 px, the model's native size.
DEMO_PROMPT = ("a large red circle at the center and a small blue square at the top left on a "
               "white background")
DEMO_EDIT = ("a large yellow circle at the center and a small blue square at the top left on a "
             "white background")
TRAIN_COMMAND = ("python -m fisedit_compiler.shapes.train --out fisedit_compiler/shapes/weights "
                 "--minutes 7")


def check_caption(name: str, text: str) -> None:
    """Refuse ``text`` (the ``name`` option's value) unless it is a caption of the model's
    grammar written as the model learnt it (``render.caption`` of its ``parse_caption``), up
    to case and spacing, which its CLIP tokenizer drops; punctuation makes other tokens. The
    tokenizer takes any text, so a misspelt colour would run and draw shapes unrelated to the
    prompt without a word."""
    from . import render

    try:
        written = render.caption(render.parse_caption(text))
        if " ".join(text.lower().split()) != written:
            raise ValueError(f"written {text!r}, where the model learnt {written!r}")
    except ValueError as error:
        raise FiseditError(
            f"{name} is not a caption the 'shapes' model knows ({error}). Its captions are "
            "objects 'a <size> <colour> <shape> at the <position>' joined by ' and ', then "
            f"' on a <background> background': sizes {', '.join(render.SIZES)}; colours "
            f"{', '.join(render.COLOURS)}; shapes {', '.join(render.SHAPES)}; positions "
            f"{', '.join(render.POSITIONS)}; backgrounds {', '.join(render.BACKGROUNDS)}; "
            f"e.g. {DEMO_PROMPT!r}") from None


def load_pipeline(path=None, dtype: torch.dtype = torch.float32):
    """The trained shapes pipeline from ``path`` (default: the package's ``weights`` folder).

    An absent or empty ``path`` gets a copy of the package's weights first (like
    ``zoo.pipeline(name, path)`` saving a built pipeline there). Raises FiseditError, naming the
    training command, when the weights are not there.
    """
    import shutil

    if path is not None:
        folder = Path(path)
        if (folder / "model_index.json").is_file():
            return pipeline_files.load_pipeline(folder, dtype)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise FiseditError(
                f"{path} is not an empty folder and holds no saved pipeline; pass an empty or "
                "new folder to copy the shapes weights into, or a folder written by "
                "save_pretrained")
    if not (WEIGHTS / "model_index.json").is_file():
        raise FiseditError(
            f"the trained 'shapes' pipeline is not installed ({WEIGHTS} holds no "
            f"model_index.json); train it on a GPU with `{TRAIN_COMMAND}` (about 8 minutes on "
            "one H100) or pass path= a folder holding a trained shapes pipeline")
    if path is None:
        return pipeline_files.load_pipeline(WEIGHTS, dtype)
    if folder.exists():
        folder.rmdir()
    shutil.copytree(WEIGHTS, folder)
    return pipeline_files.load_pipeline(folder, dtype)
