"""Offline files of diffusers pipelines, shared by ``zoo`` and ``shapes``.

Nothing can be downloaded here, so tokenizers are built from a vocabulary (and merges) written
to a temporary folder (``clip_tokenizer``; ``byte_vocab`` is CLIP's byte-level vocabulary, so
any text tokenizes), and saved pipelines load from a folder with every check done first
(``load_pipeline``).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import FiseditError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character mapping."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_vocab() -> dict[str, int]:
    """Every byte character, then each with "</w>", then the two specials (CLIP's order)."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def clip_tokenizer(vocab: dict[str, int], merges=(), max_length: int = 77):
    """A CLIPTokenizer over ``vocab`` and BPE ``merges`` (``"a b"`` strings, lowest rank
    first), built from files written to a temporary folder: ``max_length`` tokens, bos/eos,
    padded with eos (which also stands for unknown tokens)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="fisedit-tokenizer-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                           encoding="utf-8")
        Path(tmp, "merges.txt").write_text(
            "#version: 0.2\n" + "".join(merge + "\n" for merge in merges), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            tmp, model_max_length=max_length, bos_token=BOS, eos_token=EOS, unk_token=EOS,
            pad_token=EOS, local_files_only=True)


# The dtypes a pipeline runs in. The float8 types are floating dtypes too, but torch has no
# convolution or activation kernels for them: a float8 U-Net builds, then fails on its first call.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES:
        raise FiseditError(
            f"dtype must be a floating torch.dtype such as torch.float16, one of "
            f"{', '.join(map(str, DTYPES))} (the ones a U-Net runs in), got {dtype!r}")


def check_folder_path(path) -> None:
    """``path`` names a folder: a str or os.PathLike of a str, not empty."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise FiseditError(f"path must be a folder path, a str or pathlib.Path, got "
                           f"{type(path).__name__} {path!r}")
    if not text:
        # Path("") is the current folder: it would be loaded from, or refused as not empty.
        raise FiseditError("path is an empty string; pass the folder to save the pipeline in "
                           "or load from, e.g. path='pipelines/sd15-tiny'")


def read_model_index(path) -> dict:
    """The parsed ``model_index.json`` of the pipeline saved at ``path``: the JSON object
    (component name -> [library, class]) that ``save_pretrained`` writes."""
    index_file = Path(path) / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FiseditError(
            f"{path} holds no saved pipeline (no model_index.json); pass a folder written by "
            "pipe.save_pretrained(...), or zoo.pipeline(name, path=...) to build one there"
        ) from None
    except (OSError, ValueError) as e:
        raise FiseditError(
            f"{index_file} cannot be read as JSON ({e}); save the pipeline again with "
            "pipe.save_pretrained(...) or point at another folder") from None
    if not isinstance(index, dict):
        raise FiseditError(
            f"{index_file} holds a JSON {type(index).__name__}, not the object (component "
            "name -> [library, class]) that save_pretrained writes; save the pipeline again "
            "with pipe.save_pretrained(...) or point at another folder")
    return index


def _check_components_saved(path, index: dict) -> None:
    """Every component ``index`` lists has a folder at ``path`` with the files its class loads
    from (``_required_files``): a folder without them would load as something else (a
    tokenizer without its vocabulary loads with two tokens) or fail deep inside the loader."""
    missing = _missing_components(path, index)
    if missing:
        raise FiseditError(
            f"the pipeline saved at {path} lists components whose files are missing or damaged: "
            f"{', '.join(missing)}; save the whole pipeline again with pipe.save_pretrained(...) "
            "(or delete the folder and call zoo.pipeline(name, path=...) to rebuild it)")


def _missing_components(path, index: dict) -> list[str]:
    """Each listed component whose folder is missing or empty, or lacks a required file (or
    holds it unreadable), as ``name (what is wrong)``."""
    missing = []
    for key, library, name in _listed_components(index):
        folder = Path(path) / key
        if not folder.is_dir() or not any(folder.iterdir()):
            missing.append(f"{key} (no folder, or an empty one)")
            continue
        for choices in _required_files(_component_class(library, name)):
            present = [name for name in choices if (folder / name).is_file()]
            if not present:
                missing.append(f"{key} (no {' or '.join(choices)})")
            unreadable = [name for name in present
                          if name.endswith(".json") and read_json_object(folder / name) is None]
            if unreadable:
                missing.append(f"{key} ({', '.join(unreadable)} is not a JSON object)")
    return missing


def _listed_components(index: dict):
    """(name, library, class) of each component a model index lists, leaving out its own
    entries (``_class_name``, ...) and optional components saved as None."""
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2 \
                or value[0] is None or value[1] is None:
            continue
        yield key, value[0], value[1]


def _required_files(cls) -> list[tuple[str, ...]]:
    """The files a component of class ``cls`` loads from, each as the names that can stand
    for it: a diffusers model's or scheduler's config (``config_name``), a transformers
    model's ``config.json``, a tokenizer's ``tokenizer_config.json`` and its vocabulary (one
    ``tokenizer.json``, or the separate files of its ``vocab_files_names``)."""
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    if cls is None:
        return []
    if isinstance(getattr(cls, "config_name", None), str):
        return [(cls.config_name,)]
    if issubclass(cls, PreTrainedModel):
        return [("config.json",)]
    if issubclass(cls, PreTrainedTokenizerBase):
        files = dict(cls.vocab_files_names)
        single = (files.pop("tokenizer_file"),) if "tokenizer_file" in files else ()
        vocabulary = [single + (name,) for name in files.values()] or [single]
        return [("tokenizer_config.json",)] + [choice for choice in vocabulary if choice]
    return []


def load_pipeline(path, dtype: torch.dtype = torch.float32):
    """Load a pipeline saved with ``save_pretrained`` from folder ``path``, offline, as
    ``dtype``; the path, the dtype and the folder's files are checked before diffusers reads
    any weights."""
    from diffusers import DiffusionPipeline

    check_dtype(dtype)
    index = read_saved_folder(path)
    _check_model_index(path, index)
    _check_components_saved(path, index)
    with _loading(path, "the pipeline"):
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                 **_dtype_kwarg(dtype))
    _check_tokenizer_lengths(path, pipe)
    return pipe


# What transformers sets ``model_max_length`` to when a tokenizer's config names none
# (``VERY_LARGE_INTEGER``, 1e30): encoding a prompt with it overflows inside the pipeline.
_NO_MAX_LENGTH = 10**9


def _check_tokenizer_lengths(path, pipe) -> None:
    """Every tokenizer of ``pipe`` has a prompt length: the pipelines pad every prompt to it."""
    from transformers import PreTrainedTokenizerBase

    for name, component in pipe.components.items():
        if isinstance(component, PreTrainedTokenizerBase) and \
                not 0 < component.model_max_length < _NO_MAX_LENGTH:
            config = Path(path) / name / "tokenizer_config.json"
            raise FiseditError(
                f"the {name} saved at {path} has no prompt length ({config} sets no "
                "model_max_length, e.g. 77 for CLIP); save the pipeline again with "
                "pipe.save_pretrained(...) or add it to that file")


def load_unet(path, dtype: torch.dtype = torch.float32):
    """Load only the U-Net of a pipeline saved with ``save_pretrained`` in folder ``path``
    (``dump --pipeline``: the text encoders and VAE, gigabytes for SDXL, are not read), with
    the checks of ``load_pipeline`` for that component."""
    check_dtype(dtype)
    index = read_saved_folder(path)
    _check_model_index(path, index)
    entry = index.get("unet")
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2
            and all(isinstance(part, str) for part in entry)):
        listed = "none" if entry in (None, [None, None]) else f"{entry!r}, not [library, class]"
        raise FiseditError(
            f"the pipeline saved at {path} has no unet ({Path(path) / 'model_index.json'} lists "
            f"{listed}); fisedit-compiler compiles U-Net pipelines (Stable Diffusion 1.x/2.x, "
            "SDXL)")
    _check_components_saved(path, {"unet": entry})
    with _loading(path, "the U-Net of the pipeline"):
        return _component_class(*entry).from_pretrained(
            path, subfolder="unet", local_files_only=True, **_dtype_kwarg(dtype))


@contextmanager
def _loading(path, what: str):
    """A saved folder diffusers cannot load (damaged weights, a config of another version,
    weights of other sizes than the config's): bad input, reported with diffusers' reason
    rather than as a traceback."""
    try:
        yield
    except (OSError, ValueError, ImportError, AttributeError, TypeError, KeyError,
            RuntimeError) as error:
        raise FiseditError(f"diffusers cannot load {what} saved at {path} "
                           f"({type(error).__name__}: {error})") from error


def read_json_object(path) -> dict | None:
    """The JSON object in file ``path`` (a component's config, a build record), read without
    loading anything; None where the file is missing, unreadable or holds no object (loading
    the pipeline then reports what is wrong)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_saved_folder(path) -> dict:
    """The model index of the pipeline saved in folder ``path``, refused (a FiseditError)
    unless ``path`` names a folder that holds one; reads no weights, so commands check their
    ``--pipeline`` with it before loading anything."""
    check_folder_path(path)
    if not Path(path).is_dir():
        raise FiseditError(
            f"{path} is not a folder; pass the folder a pipeline was saved to with "
            "pipe.save_pretrained(...), or zoo.pipeline(name, path=...) to build one there")
    return read_model_index(path)


def _check_model_index(path, index: dict) -> None:
    """The pipeline class and every component class must be ones diffusers and transformers
    ship: a folder naming custom code would need ``trust_remote_code``, which we never pass."""
    import diffusers

    cls_name = index.get("_class_name")
    if not isinstance(cls_name, str):
        raise FiseditError(
            f"{path}/model_index.json has no _class_name (the pipeline class); save the "
            "pipeline again with pipe.save_pretrained(...)")
    if not hasattr(diffusers, cls_name):
        raise FiseditError(
            f"{path} holds a {cls_name}, which is not a diffusers pipeline (custom pipeline "
            "code is not loaded); save a StableDiffusionPipeline or StableDiffusionXLPipeline")
    for key, library, component in _listed_components(index):
        if _component_class(library, component) is None:
            raise FiseditError(
                f"{path}: component {key} is {library}.{component}, which neither diffusers "
                "nor transformers provides (custom code is not loaded); save the pipeline "
                "with stock components")


def _component_class(library: str, name: str):
    """The class a model index names for a component (``[library, class]``: diffusers,
    transformers, or a pipeline module of diffusers such as ``audioldm2``), or None."""
    import importlib

    try:
        module = importlib.import_module(library if library in ("diffusers", "transformers")
                                         else f"diffusers.pipelines.{library}")
    except (ImportError, TypeError, ValueError):
        return None
    return getattr(module, name, None) if isinstance(name, str) else None


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``dtype=`` where diffusers has it (``torch_dtype=`` is deprecated there), else ``torch_dtype=``."""
    try:
        from diffusers.utils import deprecation_utils

        new_style = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        new_style = False
    return {"dtype": dtype} if new_style else {"torch_dtype": dtype}
