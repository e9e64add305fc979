"""Real diffusers U-Net architectures built offline from their configs, with seeded random weights.

No weights can be downloaded here, and none are needed to measure compute: a U-Net with random
weights runs exactly the same operations as a trained one. Each full config below is the
published config of the named model (the fields that differ from diffusers' defaults); each
``-tiny`` variant keeps the block types and every architectural switch of its full model and
shrinks only widths and depths, so CPU tests exercise the same graph shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checks import check_seed
from .compiler.capture import example_inputs, latent_size  # noqa: F401 - part of the zoo API
from .errors import FiseditError
from .pipeline_files import (byte_vocab, check_dtype, check_folder_path, clip_tokenizer,
                             load_pipeline, read_json_object, read_model_index)

# Published configs (diffusers' UNet2DConditionModel / UNet2DModel keyword arguments).
_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
_SD21 = dict(
    _SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True,
)
_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# google/ddpm-church-256: six levels, padding-0 downsamplers, spatial self-attention at 16x16.
_DDPM = dict(
    sample_size=256, in_channels=3, out_channels=3,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6, norm_num_groups=32,
)

_TINY_SD = dict(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, sample_size=16,
)

CONFIGS: dict[str, tuple[str, dict]] = {
    "sd15": ("UNet2DConditionModel", _SD15),
    "sd21": ("UNet2DConditionModel", _SD21),
    "sdxl": ("UNet2DConditionModel", _SDXL),
    "ddpm": ("UNet2DModel", _DDPM),
    "sd15-tiny": ("UNet2DConditionModel", dict(_SD15, **_TINY_SD)),
    "sd21-tiny": ("UNet2DConditionModel", dict(
        _SD21, **dict(_TINY_SD, attention_head_dim=(4, 8)))),
    "sdxl-tiny": ("UNet2DConditionModel", dict(
        _SDXL, sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        cross_attention_dim=32, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)),
    "ddpm-tiny": ("UNet2DModel", dict(
        _DDPM, sample_size=32, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8)),
}

MODEL_NAMES = tuple(CONFIGS)


def config(name: str) -> dict:
    """The keyword arguments that build model ``name`` (a copy)."""
    _check_name(name)
    return dict(CONFIGS[name][1])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in CONFIGS:
        raise FiseditError(
            f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def unet(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """Build U-Net ``name`` from its config with random weights drawn from ``seed``, in eval mode,
    as ``dtype`` on ``device`` (a str such as "cuda:0" or a torch.device)."""
    import diffusers

    _check_name(name)
    _check_seed_and_dtype(seed, dtype)
    device = _check_device(device)
    cls_name, cfg = CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, cls_name)(**cfg)
    if dtype != torch.float32:  # diffusers' ModelMixin.to warns whenever a dtype is passed
        model = model.to(dtype=dtype)
    return model.to(device=device).eval()


def _check_seed_and_dtype(seed, dtype) -> None:
    check_seed("seed", seed)
    check_dtype(dtype)


def _component_seed(seed: int, offset: int) -> int:
    """The seed of a pipeline's ``offset``-th component after the U-Net: ``seed + offset``,
    wrapped into the 64 bits a torch seed holds, so every valid ``seed`` gives valid ones."""
    return (seed + offset) % 2 ** 64


def _check_device(device) -> torch.device:
    """``device`` as a torch.device that exists here, checked before any model is built."""
    if not isinstance(device, (str, torch.device)):
        raise FiseditError(f"device must be a str such as 'cpu' or 'cuda:0', or a torch.device, "
                           f"got {type(device).__name__} {device!r}")
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)  # raises when the device is absent (no CUDA, no such GPU)
    except (RuntimeError, AssertionError) as error:
        raise FiseditError(f"device {device!r} cannot be used here ({error}); pass 'cpu', or "
                           "'cuda' (or 'cuda:N') where a GPU is present") from None
    return parsed


def from_config(cfg: dict, *, seed: int = 0):
    """A UNet2DConditionModel built from keyword arguments ``cfg`` with random weights drawn from
    ``seed``, in eval mode.

    Always that class, whatever ``cfg`` holds: it is for variations of the conditional zoo
    configs (e.g. ``dict(config("sd15-tiny"), num_class_embeds=5)``). A UNet2DModel config such
    as ``config("ddpm")`` does not build here; build those with ``unet(name)``.
    """
    import diffusers

    if not isinstance(cfg, dict):
        raise FiseditError(f"cfg must be a dict of UNet2DConditionModel keyword arguments, got "
                           f"{type(cfg).__name__}; start from zoo.config('sd15-tiny')")
    check_seed("seed", seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return diffusers.UNet2DConditionModel(**cfg).eval()
    except (TypeError, ValueError) as error:
        # An unknown keyword, inconsistent block lists, or a UNet2DModel config: diffusers'
        # reason, as bad input rather than a traceback from deep inside its constructor.
        raise FiseditError(
            f"diffusers cannot build a UNet2DConditionModel from cfg ({type(error).__name__}: "
            f"{error}); pass UNet2DConditionModel keyword arguments, e.g. zoo.config('sd15-tiny') "
            "with fields changed, or use zoo.unet(name) for a UNet2DModel such as 'ddpm'"
        ) from error


# ---------------------------------------------------------------------------------------------
# Complete text-to-image pipelines (random weights, offline)
# ---------------------------------------------------------------------------------------------
#
# Each pipeline wraps the zoo U-Net of the same name with a VAE, CLIP text encoder(s), a locally
# built byte-level CLIP tokenizer and a DPM-Solver++ scheduler, all built from configs. The full
# sizes use the published component configs (only the vocabulary differs: ours is the 514-token
# byte-level one, since the real 49408-token BPE vocabulary cannot be downloaded); the -tiny
# variants shrink widths and depths and keep the 8x VAE and the U-Net's conditioning dimensions.

PIPELINE_NAMES = ("sd15", "sd21", "sdxl", "sd15-tiny", "sd21-tiny", "sdxl-tiny")

_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu",
)
# Four levels like the real VAE, so it downsamples 8x, at tiny widths.
_TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)

_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def _tiny_clip(hidden, act, projection):
    return dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, hidden_act=act, projection_dim=projection)


_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)

# name -> (pipeline class, VAE kwargs, [text encoder kwargs, ...], scheduler kwargs)
PIPELINE_CONFIGS: dict[str, tuple[str, dict, list[dict], dict]] = {
    "sd15": ("StableDiffusionPipeline", dict(_VAE, sample_size=512, scaling_factor=0.18215),
             [_CLIP_L], _SCHEDULER),
    "sd21": ("StableDiffusionPipeline", dict(_VAE, sample_size=768, scaling_factor=0.18215),
             [_OPENCLIP_H], dict(_SCHEDULER, prediction_type="v_prediction")),
    "sdxl": ("StableDiffusionXLPipeline", dict(_VAE, sample_size=1024, scaling_factor=0.13025),
             [_CLIP_L, _OPENCLIP_BIGG], _SCHEDULER),
    "sd15-tiny": ("StableDiffusionPipeline",
                  dict(_VAE, **_TINY_VAE, sample_size=128, scaling_factor=0.18215),
                  [_tiny_clip(32, "quick_gelu", 32)], _SCHEDULER),
    "sd21-tiny": ("StableDiffusionPipeline",
                  dict(_VAE, **_TINY_VAE, sample_size=128, scaling_factor=0.18215),
                  [_tiny_clip(32, "gelu", 32)], dict(_SCHEDULER, prediction_type="v_prediction")),
    # SDXL concatenates both encoders' penultimate states: 16 + 16 = the tiny U-Net's 32, and
    # text_encoder_2's pooled projection (32) + 6 * addition_time_embed_dim (8) = 80.
    "sdxl-tiny": ("StableDiffusionXLPipeline",
                  dict(_VAE, **_TINY_VAE, sample_size=128, scaling_factor=0.13025),
                  [_tiny_clip(16, "quick_gelu", 16), _tiny_clip(16, "gelu", 32)], _SCHEDULER),
}

def check_pipeline_name(name) -> None:
    """``name`` is one of ``pipeline``'s names (PIPELINE_NAMES, or "shapes"); checked by the
    commands before they load anything."""
    if name == "shapes":
        return
    if not isinstance(name, str) or (name not in PIPELINE_CONFIGS
                                     and name not in ("ddpm", "ddpm-tiny")):
        raise FiseditError(f"unknown pipeline name {name!r}; choose one of "
                           f"{', '.join(PIPELINE_NAMES + ('shapes',))}")
    if name in ("ddpm", "ddpm-tiny"):
        raise FiseditError(
            f"{name!r} is an unconditional DDPM U-Net and has no text-to-image pipeline; "
            f"use zoo.unet({name!r}) instead, or pick a pipeline name: {', '.join(PIPELINE_NAMES)}")
    if name not in PIPELINE_CONFIGS:
        raise FiseditError(
            f"unknown pipeline name {name!r}; choose one of {', '.join(PIPELINE_NAMES)}")


def tokenizer():
    """A CLIPTokenizer over the byte-level vocabulary: any text tokenizes (one token per UTF-8
    byte, no merges), so prompts behave like real ones for the pipeline: 77 tokens, bos/eos,
    padded with eos."""
    return clip_tokenizer(byte_vocab())


def _text_encoder(cfg: dict, tok, *, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **cfg, vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def _check_dims(name: str, unet_model, encoders) -> None:
    """The text encoders must produce what the U-Net's cross-attention and added conditions take."""
    cfg = unet_model.config
    hidden = sum(e.config.hidden_size for e in encoders)
    if hidden != cfg.cross_attention_dim:
        raise FiseditError(  # only reachable if the config tables above are edited inconsistently
            f"zoo pipeline {name!r}: text encoder hidden sizes sum to {hidden} but the U-Net's "
            f"cross_attention_dim is {cfg.cross_attention_dim}; fix PIPELINE_CONFIGS")
    if cfg.addition_embed_type == "text_time":
        want = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        if encoders[-1].config.projection_dim != want:
            raise FiseditError(
                f"zoo pipeline {name!r}: text_encoder_2 projection_dim is "
                f"{encoders[-1].config.projection_dim} but the U-Net's added conditions take "
                f"{want}; fix PIPELINE_CONFIGS")


def _build_pipeline(name: str, seed: int, dtype: torch.dtype):
    import diffusers

    cls_name, vae_cfg, text_cfgs, sched_cfg = PIPELINE_CONFIGS[name]
    unet_model = unet(name, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, 1))
        vae = diffusers.AutoencoderKL(**vae_cfg).eval()
    tok = tokenizer()
    sdxl = cls_name == "StableDiffusionXLPipeline"
    encoders = [
        _text_encoder(cfg, tok, with_projection=sdxl and i == 1, seed=_component_seed(seed, 2 + i))
        for i, cfg in enumerate(text_cfgs)
    ]
    _check_dims(name, unet_model, encoders)
    scheduler = diffusers.DPMSolverMultistepScheduler(**sched_cfg)
    if dtype != torch.float32:
        # Cast the components, not the pipeline: DiffusionPipeline.to(dtype) warns on CPU.
        for module in (unet_model, vae, *encoders):
            module.to(dtype)
    if sdxl:
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
            tokenizer_2=tokenizer(), unet=unet_model, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=encoders[0], tokenizer=tok, unet=unet_model, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _check_saved_matches(name: str, path, index: dict) -> None:
    """A saved pipeline loaded under a zoo name must be that model (class and U-Net config)."""
    cls_name = PIPELINE_CONFIGS[name][0]
    problem = None
    if index.get("_class_name") != cls_name:
        problem = f"a {index.get('_class_name')}, not a {cls_name}"
    else:
        try:
            saved = json.loads((Path(path) / "unet" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None  # load_pipeline reports unreadable components
        if saved is not None and not isinstance(saved, dict):
            raise FiseditError(
                f"{path}/unet/config.json holds a JSON {type(saved).__name__}, not a U-Net "
                "config; save the pipeline again with pipe.save_pretrained(...) or point at "
                "another folder")
        if saved is not None:
            def norm(v):
                return list(v) if isinstance(v, (list, tuple)) else v

            for key, want in CONFIGS[name][1].items():
                got = saved.get(key)
                if key in saved and norm(got) != norm(want):
                    problem = f"a U-Net with {key}={got!r}, not {want!r}"
                    break
    if problem:
        raise FiseditError(
            f"{path} holds {problem}, so it is not zoo pipeline {name!r}; pass name=None to "
            "load whatever is saved there, or choose another (empty) folder for this name")


def pipeline(name: str | None, path=None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A complete offline diffusers text-to-image pipeline with random weights drawn from ``seed``.

    ``name`` is one of PIPELINE_NAMES: StableDiffusionPipeline for sd15/sd21 (and -tiny),
    StableDiffusionXLPipeline for sdxl (and -tiny); its U-Net is ``unet(name, seed=seed)``.
    With ``path`` (a str or PathLike): a folder that holds a saved pipeline (model_index.json)
    is loaded from there with its saved weights (``name`` may then be None, and ``seed`` must
    be left at 0 or be the one this function built it with, recorded in ``BUILD_RECORD``: any
    other cannot apply); an absent or empty folder gets the pipeline built from ``seed`` saved
    to it, so the same call builds once and then loads.

    ``name="shapes"`` is the exception: the small StableDiffusionPipeline *trained* on rendered
    scenes (``fisedit_compiler.shapes``), loaded from the package's weights folder (``path``:
    from there instead, or an empty folder to copy the weights into); its weights are trained,
    so ``seed`` must be left at 0. A FiseditError names the training command if the weights
    are missing.
    """
    _check_seed_and_dtype(seed, dtype)
    if path is not None:
        check_folder_path(path)
    if name == "shapes":
        if seed != 0:
            raise FiseditError(
                f"seed={seed} cannot apply to 'shapes': its weights are trained, not drawn from "
                "a seed; leave seed out (pick images with the generator passed to the pipeline)")
    elif name is not None:
        check_pipeline_name(name)
    elif path is None:
        raise FiseditError(
            "zoo.pipeline needs a name to build or a path to load; pass one of "
            f"{', '.join(PIPELINE_NAMES)}, or path= a folder written by save_pretrained")
    folder = None if path is None else Path(path)
    # A damaged model_index.json is refused here, before anything is loaded from the folder.
    index = read_model_index(folder) if folder is not None and (
        folder / "model_index.json").is_file() else None
    if name == "shapes":
        from .shapes import load_pipeline as load_shapes

        return load_shapes(path, dtype)
    if folder is None:
        return _build_pipeline(name, seed, dtype)
    if index is not None:
        built = _build_record(folder)
        if seed != 0 and seed != built.get("seed"):
            made = (f"was built with seed={built['seed']}" if "seed" in built
                    else "holds a saved pipeline")
            raise FiseditError(
                f"seed={seed} cannot apply: {path} {made}, which loads with its saved weights; "
                "leave seed out to load it, or pass an empty or new folder to build with "
                f"seed={seed} and save there")
        if name is not None:
            _check_saved_matches(name, folder, index)
        return load_pipeline(folder, dtype)
    if folder.exists() and not folder.is_dir():
        raise FiseditError(
            f"{path} is a file, not a folder; pass a folder to save the pipeline in or load from")
    if folder.is_dir() and any(folder.iterdir()):
        raise FiseditError(
            f"{path} is not empty and holds no saved pipeline (no model_index.json); pass an "
            "empty or new folder to build and save there, or a folder written by "
            "pipe.save_pretrained(...) to load")
    if name is None:
        raise FiseditError(
            f"{path} holds no saved pipeline to load; pass a name to build one there "
            f"({', '.join(PIPELINE_NAMES)})")
    pipe = _build_pipeline(name, seed, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    # What built it, so that the same call loads it again (build once, then load).
    (folder / BUILD_RECORD).write_text(json.dumps({"name": name, "seed": seed}),
                                       encoding="utf-8")
    return pipe


# Beside model_index.json in a folder zoo.pipeline built: the name and seed it was built from.
BUILD_RECORD = "fisedit_zoo_build.json"


def _build_record(folder: Path) -> dict:
    """The name and seed ``folder``'s pipeline was built from by ``pipeline``; {} if none (a
    pipeline saved otherwise) or unreadable."""
    return read_json_object(folder / BUILD_RECORD) or {}

