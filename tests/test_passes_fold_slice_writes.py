"""fold_slice_writes: a buffer written slice by slice (sliced attention's heads, FreeU's
scaled channels, any slice assignments) becomes a cat of the values and the untouched
slices; a buffer read between its writes stays as written."""

import re

import pytest
import torch

from fisedit_compiler import ir, zoo
from fisedit_compiler.compiler.pipeline import trace
from fisedit_compiler.graph_keys import UNKNOWN_OPS
from pass_checks import attention_nodes, box, box_edit, edit_checked


def dense_warnings(run):
    return [w for w in run.caught if "run dense in edits" in str(w.message)]


@pytest.mark.parametrize("slice_size", [1, 3])
def test_sliced_attention_edits_run_sparse_and_exact(slice_size):
    """enable_attention_slicing: the heads' outputs written slice by slice into one buffer
    (3 does not divide sd15-tiny's 2 x 8 heads: the last slice is short)."""
    unet = zoo.unet("sd15-tiny")
    unet.set_attention_slice(slice_size)
    inputs = zoo.example_inputs(unet, batch=2)
    gm = trace(unet, inputs)
    assert not gm.meta[UNKNOWN_OPS]           # no slice_scatter or copy left
    assert len(attention_nodes(gm)) == 8 * -(-16 // slice_size)
    edit_checked(unet, inputs, box(slice(5, 8), slice(9, 12)))


def halves_written(partial: bool, read_half_filled: bool = False):
    """A conv_in hook that writes its output's channels into a new buffer in two slices (a
    partial one ending at a negative index)."""
    def hook(module, args, out):
        buffer = torch.zeros_like(out)
        buffer[:, :16] = out[:, :16] * 2
        early = buffer * 1.0 if read_half_filled else 0
        buffer[:, 16:-2 if partial else 32] = out[:, 16:-2 if partial else 32]
        return buffer + early
    return hook


@pytest.mark.parametrize("partial, read_half_filled, folded", [
    (False, False, True), (True, False, True), (False, True, False)])
def test_writes_fold_unless_the_buffer_is_read_between_them(partial, read_half_filled,
                                                            folded):
    unet = zoo.unet("sd15-tiny")
    unet.conv_in.register_forward_hook(halves_written(partial, read_half_filled))
    run = box_edit(unet, slice(2, 4), slice(10, 12))
    unknown = run.engine.program(run.inputs).canonical.meta[UNKNOWN_OPS]
    assert ("aten.slice_scatter.default" not in unknown) == folded
    # (zeros_like, a factory of positions, runs dense either way: no MACs.)
    assert any("slice_scatter" in str(w.message) for w in dense_warnings(run)) == (not folded)
    if not folded:
        assert any(re.search(r"in conv_in \(", str(w.message)) for w in dense_warnings(run))
    assert run.error <= 1e-5
    canonical = run.engine.program(run.inputs).canonical
    assert any(ir.is_call(node, ir.cat) and "slice_scatter" in node.meta[ir.META_SOURCE]
               for node in canonical.graph.nodes) == folded


def test_freeus_in_place_channel_scaling_folds():
    """FreeU scales half of the up blocks' channels in place (``h[:, :C // 2] *= b``): one
    write, the other half kept; its Fourier filter mixes positions and stays dense."""
    unet = zoo.unet("sd15-tiny")
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    run = box_edit(unet, slice(2, 4), slice(10, 12))
    unknown = run.engine.program(run.inputs).canonical.meta[UNKNOWN_OPS]
    assert "aten.slice_scatter.default" not in unknown and unknown     # the FFT ops remain
    assert run.error <= 1e-5
