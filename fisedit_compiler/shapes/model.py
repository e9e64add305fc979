"""The "shapes" text-to-image pipeline: component configs, a word-level tokenizer, the builder.

A complete diffusers StableDiffusionPipeline, small enough to train from scratch in minutes
and to run on a CPU in a fraction of a second per step:

* AutoencoderKL 64x64x3 <-> 16x16x4: three levels of 32/64/128 channels (flat-coloured
  shapes need few channels at full resolution, where a VAE spends its compute), so 2
  downsamplings, 4x rather than SD's 8x: at 64 px an 8x latent would be 8x8, too coarse for a
  3x3 grid of objects and for sparse edits. No mid-block attention (the decoder stays local
  apart from its group norms, so a latent edit disturbs few decoded pixels outside it); 4
  latent channels like SD, so the U-Net and the edit flow see the usual latent layout.
* UNet2DConditionModel at 16x16 latents: levels 16/8/4 with 64/128/128 channels and
  cross-attention at every level (objects are 2-5 latent pixels big: the finest level's
  cross-attention is what binds a word like "left" to the right place, and it gives
  cross-attention control useful maps); one ResNet + transformer layer per level on the way
  down (two on the way up, as diffusers builds it). About 7 M parameters: with the VAE (2.6 M)
  and the text encoder (0.7 M) the fp16 weights take about 21 MB.
* CLIPTextModel, 3 layers, hidden 128, 32 positions (the longest caption is 30 words plus
  BOS/EOS), over a word-level CLIPTokenizer built locally (``tokenizer``).
* DDIMScheduler (the edit flow's default) with the training noise schedule: cosine
  ("squaredcos_cap_v2", near-zero terminal SNR, the usual choice at low resolution, so the
  backgrounds' exact brightness is learnable: black stays black), v-prediction (well
  defined at zero SNR), "trailing" timestep spacing (the first sampling step starts at
  t = 999), no sample clipping (latents are not in [-1, 1]).

``tiny=True`` shrinks every width and depth (same structure) for CPU tests.
"""

from __future__ import annotations

import torch

from ..pipeline_files import byte_vocab, clip_tokenizer
from . import render

MAX_LENGTH = 32
LATENT_FACTOR = 4
IMAGE_SIZE = 64

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
    act_fn="silu", sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    scaling_factor=1.0,   # set by training from the latents' standard deviation
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // LATENT_FACTOR, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=4,
    cross_attention_dim=128, norm_num_groups=32,
)
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                   num_attention_heads=4, hidden_act="quick_gelu", projection_dim=128)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=1,
)

TINY_VAE = dict(block_out_channels=(16, 16, 32), norm_num_groups=8)
TINY_UNET = dict(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=2,
                 cross_attention_dim=32, norm_num_groups=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, projection_dim=32)


def vae_config(tiny: bool = False, image_size: int = IMAGE_SIZE) -> dict:
    return dict(VAE_CONFIG, **(TINY_VAE if tiny else {}), sample_size=image_size)


def unet_config(tiny: bool = False, image_size: int = IMAGE_SIZE) -> dict:
    return dict(UNET_CONFIG, **(TINY_UNET if tiny else {}),
                sample_size=image_size // LATENT_FACTOR)


def text_config(tiny: bool = False) -> dict:
    return dict(TEXT_CONFIG, **(TINY_TEXT if tiny else {}))


# ---------------------------------------------------------------------------------- tokenizer

def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level vocabulary (so any text still tokenizes, one token per byte) plus one
    token per grammar word, reached through a chain of merges of the word's prefixes.

    BPE applies the lowest-ranked merge among a word's adjacent pairs first, so a word's chain
    could be cut by another word's merge of a pair inside it (background's "g r" is green's
    first merge). Longer words' chains come first; ``tokenizer`` checks that every grammar
    word ends up as one token.
    """
    vocab = byte_vocab()
    merges: list[str] = []
    words = sorted(render.grammar_words(), key=lambda w: (-len(w), w))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current = current + piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def tokenizer(max_length: int = MAX_LENGTH):
    """A CLIPTokenizer whose every grammar word is one token, built from files written to a
    temporary folder (nothing is downloaded); padded to ``max_length`` with EOS like CLIP."""
    tok = clip_tokenizer(*_vocab_and_merges(), max_length=max_length)
    for word in render.grammar_words():
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"the shapes tokenizer splits {word!r} into {ids}; fix the merge "
                               "order in _vocab_and_merges")
    return tok


class WordEncoder:
    """Grammar captions -> token ids without the tokenizer's per-call overhead (training
    encodes a batch every step); equal to ``tokenizer(captions, padding="max_length")``
    for grammar captions (tests check this). Other words fall back to the tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.length = tok.model_max_length
        self.ids = {w: tok(w, add_special_tokens=False).input_ids for w in render.grammar_words()}
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for text in captions:
            ids = [self.bos]
            for word in text.split():
                ids.extend(self.ids[word] if word in self.ids
                           else self.tok(word, add_special_tokens=False).input_ids)
            ids = ids[:self.length - 1] + [self.eos]
            rows.append(ids + [self.pad] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(captions), self.length)


# --------------------------------------------------------------------------------- components

def build_vae(tiny: bool = False, seed: int = 0, image_size: int = IMAGE_SIZE):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**vae_config(tiny, image_size))


def build_unet(tiny: bool = False, seed: int = 0, image_size: int = IMAGE_SIZE):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config(tiny, image_size))


def build_text_encoder(tok, tiny: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        **text_config(tiny), vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def training_scheduler():
    """The DDPM scheduler with the same noise schedule (``add_noise``, ``get_velocity``)."""
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}
    return DDPMScheduler(**cfg)


def assemble(vae, text_encoder, tok, unet, scheduler=None):
    """A StableDiffusionPipeline from the components (eval mode; no safety checker)."""
    from diffusers import StableDiffusionPipeline

    for module in (vae, text_encoder, unet):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def build_pipeline(tiny: bool = False, seed: int = 0, image_size: int = IMAGE_SIZE):
    """A randomly initialised shapes pipeline (what training starts from; tests use tiny=True)."""
    tok = tokenizer()
    return assemble(build_vae(tiny, seed, image_size), build_text_encoder(tok, tiny, seed + 1),
                    tok, build_unet(tiny, seed + 2, image_size))


def num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
