"""Cross-attention control for the probe steps (Prompt-to-Prompt style).

(docs/design.md, "Editing flow".)

FISEdit's paper says the mask is "stabilized by reusing parts of the cross-attention map
corresponding to the unchanged text", but its released code has no such part, so this is our
design: during a probe step, the U-Net first runs on the recorded generation's inputs of that
step and every cross-attention layer (``attn2``) keeps its attention probabilities; then the
edit's call runs with, for each token position the two prompts share, the recorded
probabilities in place of its own (conditional half of the CFG batch only, as in P2P). Shared
positions come from aligning the two token sequences (``difflib``), so insertions and
replacements of words keep the surrounding tokens aligned. The processors are installed with
``unet.set_attn_processor`` around these two calls only and always restored.

``TokenAttentionMaps`` reads, through the same processor, where the tokens that differ between
two prompts (``changed_tokens``) attend: the ``cross-attention`` mask estimators' evidence.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def shared_tokens(tokenizer, old_prompt: str, new_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(new, old)`` of the tokens both prompts share, after alignment of the padded
    token sequences the text encoder sees (BOS and padding included)."""
    def ids(prompt):
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True).input_ids

    old, new = ids(old_prompt), ids(new_prompt)
    new_positions, old_positions = [], []
    for block in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_matching_blocks():
        old_positions.extend(range(block.a, block.a + block.size))
        new_positions.extend(range(block.b, block.b + block.size))
    return torch.tensor(new_positions, dtype=torch.long), torch.tensor(old_positions,
                                                                       dtype=torch.long)


class CrossAttentionControl:
    """Captures (mode ``capture``) or injects (mode ``inject``) cross-attention probabilities."""

    def __init__(self, new_positions: torch.Tensor, old_positions: torch.Tensor):
        self.new_positions, self.old_positions = new_positions, old_positions
        self.mode = "capture"
        self.probabilities: dict[str, torch.Tensor] = {}

    @contextmanager
    def installed(self, unet, mode: str):
        """Install the controlled processor on every cross-attention layer of ``unet`` in
        ``mode``; restore the previous processors on exit."""
        self.mode = mode
        with _cross_attention_hook(unet, self):
            yield

    def __call__(self, name: str, probabilities: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.mode == "capture":
            self.probabilities[name] = probabilities
            return probabilities
        recorded = self.probabilities[name]
        # Rows are batch-major over heads; with CFG the conditional half is the second one.
        start = probabilities.shape[0] // 2 if batch_size > 1 else 0
        probabilities = probabilities.clone()
        probabilities[start:, :, self.new_positions] = recorded[start:, :, self.old_positions]
        return probabilities


def changed_tokens(tokenizer, old_prompt: str, new_prompt: str) -> tuple[list[int], list[int]]:
    """Positions of the tokens that only the new (first list) or only the old prompt (second)
    has, padding left out: the words an edit adds, replaces or removes."""
    new_shared, old_shared = shared_tokens(tokenizer, old_prompt, new_prompt)

    def length(prompt):
        return min(len(tokenizer(prompt).input_ids), tokenizer.model_max_length)

    return ([i for i in range(length(new_prompt)) if i not in set(new_shared.tolist())],
            [i for i in range(length(old_prompt)) if i not in set(old_shared.tolist())])


class TokenAttentionMaps:
    """Sums, over the cross-attention layers of one U-Net call, the attention that each batch
    row's pixels pay to that row's chosen token positions (averaged over heads, resized to the
    latent): ``maps`` ``[batch, H, W]``. Rows without tokens add nothing."""

    def __init__(self, tokens_per_row: list[list[int]], latent_size: tuple[int, int]):
        self.tokens_per_row, self.latent_size = tokens_per_row, latent_size
        self.maps = torch.zeros(len(tokens_per_row), *latent_size)

    @contextmanager
    def installed(self, unet):
        with _cross_attention_hook(unet, self):
            yield

    def __call__(self, name: str, probabilities: torch.Tensor, batch_size: int) -> torch.Tensor:
        pixels = probabilities.shape[1]
        height, width = layer_size(self.latent_size, pixels)
        per_row = probabilities.view(batch_size, -1, pixels, probabilities.shape[-1]).mean(1)
        for row, tokens in enumerate(self.tokens_per_row):
            if tokens:
                attention = per_row[row][:, tokens].sum(-1).float()
                attention = attention.view(1, 1, height, width)
                self.maps[row] += F.interpolate(attention, size=self.latent_size,
                                                mode="bilinear", align_corners=False)[0, 0].cpu()
        return probabilities


def layer_size(latent_size: tuple[int, int], pixels: int) -> tuple[int, int]:
    """The height and width of a U-Net layer with ``pixels`` positions: the latent's, halved
    as its downsamplers halve them until that many are left. A stride-2 conv rounds an odd
    side up (9 becomes 5), a 2x2 pooling down (9 becomes 4). The attention sees the layer as a
    flat token sequence, so its shape must be found again."""
    for halve in (lambda side: -(-side // 2), lambda side: side // 2):
        height, width = latent_size
        while height * width > pixels:
            height, width = halve(height), halve(width)
        if height * width == pixels:
            return height, width
    raise ValueError(f"no downsampling of the {latent_size[0]}x{latent_size[1]} latent has "
                     f"{pixels} positions")


@contextmanager
def _cross_attention_hook(unet, hook):
    """Install on every cross-attention layer (``attn2``) of ``unet`` a processor that passes
    its probabilities through ``hook(name, probabilities, batch_size)``; restore on exit."""
    previous = unet.attn_processors
    unet.set_attn_processor({name: _HookedAttnProcessor(hook, name)
                             if name.endswith("attn2.processor") else processor
                             for name, processor in previous.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


class _HookedAttnProcessor:
    """diffusers' plain ``AttnProcessor`` for cross-attention, with the probabilities passed
    through ``hook(name, probabilities, batch_size)``."""

    def __init__(self, hook, name: str):
        self.hook, self.name = hook, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(attn.head_to_batch_dim(query), key,
                                                  attention_mask)
        probabilities = self.hook(self.name, probabilities, batch_size)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
