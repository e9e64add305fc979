"""analyze on the tiny zoo graphs: levels, domains, attention kinds, invariance, MACs."""

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fisedit_compiler import ir
from fisedit_compiler.compiler import capture
from fisedit_compiler.passes.analyze import META_BY_SHAPE, Domain, analyze
from fisedit_compiler.passes.canonicalize import canonicalize


def nodes(gm, *names):
    return [n for n in gm.graph.nodes if ir.is_op(n, *names)]


def domain(node):
    return node.meta[ir.META_DOMAIN]


def module(node):
    return node.meta[ir.META_MODULE]


@pytest.mark.parametrize("name, levels", [
    ("sd15-tiny", [(16, 16), (8, 8)]),
    ("sd21-tiny", [(16, 16), (8, 8)]),
    ("sdxl-tiny", [(16, 16), (8, 8), (4, 4)]),
    ("ddpm-tiny", [(32, 32), (16, 16), (8, 8), (4, 4)]),
])
def test_levels(traced, name, levels):
    gm = traced(name).gm
    assert gm.meta["fc_levels"] == levels
    for node in nodes(gm, "conv2d"):  # every conv output sits at the level of its size
        d = domain(node)
        assert d.kind == "spatial" and d.dims == (2, 3)
        assert levels[d.level] == tuple(node.meta["val"].shape[2:]) == d.size


@pytest.mark.parametrize("name, self_attn, cross_attn", [
    ("sd15-tiny", 4, 4), ("sd21-tiny", 4, 4), ("sdxl-tiny", 11, 11), ("ddpm-tiny", 4, 0)])
def test_attention_kinds(traced, name, self_attn, cross_attn):
    attention = nodes(traced(name).gm, "attention")
    kinds = Counter(n.meta[ir.META_ATTN_KIND] for n in attention)
    assert (kinds["self"], kinds["cross"]) == (self_attn, cross_attn)
    for node in attention:  # queries are image tokens: [B, heads, H*W, d]
        assert domain(node).kind == "tokens" and domain(node).dims == (2,)
        key = node.args[1].meta[ir.META_DOMAIN]
        assert key.positional == (node.meta[ir.META_ATTN_KIND] == "self")


def test_domains_of_sd15_tiny(traced):
    gm = traced("sd15-tiny").gm
    for node in nodes(gm, "linear"):
        # The time embedding and its per-resnet projections, and the text K/V, are global;
        # every other linear (q/out projections, feed-forward) acts per image token.
        path = module(node)
        is_global = path.startswith("time_embedding") or path.endswith(
            ("time_emb_proj", "attn2.to_k", "attn2.to_v"))
        assert domain(node).kind == ("global" if is_global else "tokens"), path
    for node in nodes(gm, "group_norm"):
        assert domain(node).kind == "spatial"
    for node in nodes(gm, "layer_norm"):
        assert domain(node).kind == "tokens"
    assert not any(domain(n).kind == "opaque" for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny", "ddpm-tiny"])
def test_timestep_chain_is_per_step(traced, name):
    gm = traced(name).gm
    chain = [n for n in gm.graph.nodes if module(n).startswith(("time_proj", "time_embedding"))]
    assert chain
    assert {n.meta[ir.META_INVARIANT] for n in chain} <= {"step", "constant"}
    assert all(domain(n).kind == "global" for n in chain)
    timestep = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "timestep")
    assert timestep.meta[ir.META_INVARIANT] == "step"
    time_emb_proj = [n for n in nodes(gm, "linear") if module(n).endswith("time_emb_proj")]
    assert time_emb_proj and all(n.meta[ir.META_INVARIANT] == "step" for n in time_emb_proj)


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny"])
def test_cross_attention_kv_is_per_prompt(traced, name):
    gm = traced(name).gm
    kv = [n for n in nodes(gm, "linear") if module(n).endswith(("attn2.to_k", "attn2.to_v"))]
    cross = [n for n in nodes(gm, "attention") if n.meta[ir.META_ATTN_KIND] == "cross"]
    assert len(kv) == 2 * len(cross)  # one K and one V projection per cross-attention
    assert all(n.meta[ir.META_INVARIANT] == "prompt" for n in kv)
    assert all(n.meta[ir.META_DEPENDS] == {"encoder_hidden_states"} for n in kv)
    queries = [n for n in nodes(gm, "linear") if module(n).endswith("attn2.to_q")]
    assert queries and all(n.meta[ir.META_INVARIANT] is None for n in queries)


def test_unconditional_model_has_nothing_per_prompt(traced):
    invariants = {n.meta[ir.META_INVARIANT] for n in traced("ddpm-tiny").gm.graph.nodes}
    assert "prompt" not in invariants


@pytest.mark.parametrize("name", ["sd15-tiny", "ddpm-tiny"])
def test_macs_match_formulas(traced, name):
    """Conv and linear MACs from the nn.Module that produced each node; attention from shapes."""
    t = traced(name)
    for node in nodes(t.gm, "conv2d", "linear"):
        layer = t.unet.get_submodule(module(node))
        out = node.meta["val"].shape
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            expected = math.prod(out) * layer.in_channels // layer.groups * kh * kw
        else:
            assert isinstance(layer, nn.Linear)
            expected = math.prod(out) * layer.in_features
        assert node.meta[ir.META_MACS] == expected, module(node)
    for node in nodes(t.gm, "attention"):
        batch, heads, queries, depth = node.args[0].meta["val"].shape
        keys = node.args[1].meta["val"].shape[2]
        assert node.meta[ir.META_MACS] == 2 * batch * heads * queries * keys * depth
    others = [n for n in t.gm.graph.nodes if not ir.is_op(n, "conv2d", "linear", "attention")]
    assert all(n.meta[ir.META_MACS] == 0 for n in others)


class PooledAndPadded(nn.Module):
    """Ops outside the canonical set between convolutions: average pooling (IF's and
    Kandinsky's downsamplers), a reflect pad (the latent upscaler's) and a channel cumsum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample):
        pooled = self.conv(F.avg_pool2d(self.conv(sample), 2))
        padded = F.conv2d(F.pad(pooled, (1, 1, 1, 1), mode="reflect"), self.conv.weight)
        return torch.cumsum(padded, dim=1)


def test_unfollowed_spatial_values_are_placed_by_shape():
    module, sample = PooledAndPadded().eval(), torch.randn(2, 4, 8, 8)
    program = torch.export.export(module, (sample,), strict=False)
    gm = analyze(canonicalize(capture.program_to_graph_module(program)))
    by_shape = {ir.op_name(n) or str(n.target): domain(n) for n in gm.graph.nodes
                if n.meta.get(META_BY_SHAPE)}
    # avg_pool2d, the conv reading the (opaque, larger) reflect-padded value, and cumsum.
    assert by_shape == {"aten.avg_pool2d.default": Domain("spatial", (2, 3), (4, 4), 1),
                        "conv2d": Domain("spatial", (2, 3), (4, 4), 1),
                        "aten.cumsum.default": Domain("spatial", (2, 3), (4, 4), 1)}
    pad = next(n for n in gm.graph.nodes if str(n.target) == "aten.pad.default")
    assert domain(pad).kind == "opaque"          # [2, 4, 6, 6]: no size of the pyramid
    conv_after_pool = next(n for n in nodes(gm, "conv2d")
                           if n.args[0].meta.get(META_BY_SHAPE))
    assert not conv_after_pool.meta.get(META_BY_SHAPE)   # followed again after the pool
    assert gm.meta["fc_levels"] == [(8, 8), (4, 4)]


class FourierFiltered(nn.Module):
    """A conv, a Fourier filter as FreeU's (``fftn``, ``fftshift``, a frequency mask, the
    inverse, ``.real``) and a conv: the spectrum is ``[B, C, H, W]`` too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample):
        spectrum = torch.fft.fftshift(torch.fft.fftn(self.conv(sample), dim=(-2, -1)),
                                      dim=(-2, -1))
        scale = torch.ones(spectrum.shape)
        scale[..., 3:5, 3:5] = 0.5
        filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * scale, dim=(-2, -1)),
                                   dim=(-2, -1)).real
        return self.conv(filtered)


def test_a_spectrum_is_not_placed_by_shape():
    """Its positions are frequencies: placed as spatial, it was restricted to the region
    frequency by frequency (FreeU's edits 3x further from the dense U-Net than without it).
    The filter stays opaque up to its real output, which has positions again."""
    module, sample = FourierFiltered().eval(), torch.randn(2, 4, 8, 8)
    program = torch.export.export(module, (sample,), strict=False)
    gm = analyze(canonicalize(capture.program_to_graph_module(program)))
    spectra = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].is_complex()]
    assert len(spectra) >= 4
    assert all(domain(n).kind == "opaque" for n in spectra)
    real = [n for n in gm.graph.nodes if n.meta.get(META_BY_SHAPE)]
    assert len(real) == 1 and not real[0].meta["val"].is_complex()
    assert domain(real[0]) == Domain("spatial", (2, 3), (8, 8), 0)
