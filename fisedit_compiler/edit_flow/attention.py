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
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager

import torch


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

    def processor(self, name: str) -> "_ControlledAttnProcessor":
        return _ControlledAttnProcessor(self, name)

    @contextmanager
    def installed(self, unet, mode: str):
        """Install the controlled processor on every cross-attention layer of ``unet`` in
        ``mode``; restore the previous processors on exit."""
        previous = unet.attn_processors
        self.mode = mode
        unet.set_attn_processor({name: self.processor(name) if name.endswith("attn2.processor")
                                 else processor for name, processor in previous.items()})
        try:
            yield
        finally:
            unet.set_attn_processor(previous)


class _ControlledAttnProcessor:
    """diffusers' plain ``AttnProcessor`` for cross-attention, with the probabilities exposed."""

    def __init__(self, control: CrossAttentionControl, name: str):
        self.control, self.name = control, name

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
        probabilities = self._control(probabilities, batch_size)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _control(self, probabilities: torch.Tensor, batch_size: int) -> torch.Tensor:
        control = self.control
        if control.mode == "capture":
            control.probabilities[self.name] = probabilities
            return probabilities
        recorded = control.probabilities[self.name]
        # Rows are batch-major over heads; with CFG the conditional half is the second one.
        start = probabilities.shape[0] // 2 if batch_size > 1 else 0
        probabilities = probabilities.clone()
        probabilities[start:, :, control.new_positions] = \
            recorded[start:, :, control.old_positions]
        return probabilities
