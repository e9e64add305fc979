"""canonicalize: map an ATen-level captured graph onto the canonical op set of ``ir``.

Why: export and Dynamo reach ATen with many spellings of one thing (``view``, ``reshape``,
``flatten``, ``unsqueeze`` are all reshapes; ``transpose`` is a permute; ``chunk`` is a split;
``to.dtype`` may be a no-op). Passes should match one form. This pass rewrites every known op to
its canonical function with positional, fully explicit arguments (shapes taken from the
captured static shapes), folds no-ops (division or multiplication by 1.0, dropout with p = 0 or
in eval, casts to the same dtype, ``contiguous``, ``clone``, metadata asserts) and folds a zero
``pad`` that feeds only convolutions into their (top, bottom, left, right) padding.

An op with no canonical form is copied unchanged, tagged ``META_UNKNOWN`` and listed in
``gm.meta["fc_unknown_ops"]``: never dropped, so the canonical graph still equals eager.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ir
from ..graph_keys import UNKNOWN_OPS

aten = torch.ops.aten


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a new GraphModule in the canonical dialect (the input graph is left unchanged)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node | object] = {}
    unknown: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda n: env[n]))
            continue
        if node.op != "call_function":
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        rule = _RULES.get(node.target)
        result = rule(_Builder(graph, env, node), _arguments(node)) if rule else None
        if result is None:
            new = graph.node_copy(node, lambda n: env[n])
            new.meta[ir.META_UNKNOWN] = True
            unknown[str(node.target)] = unknown.get(str(node.target), 0) + 1
            env[node] = new
        else:
            env[node] = result
    graph.eliminate_dead_code()
    result_gm = fx.GraphModule(gm, graph)
    result_gm.meta.update(gm.meta)
    result_gm.meta[UNKNOWN_OPS] = unknown
    return result_gm


def _arguments(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {"args": node.args, **node.kwargs}
    named = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            named[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
        else:
            named[argument.name] = None
    return named


class _Builder:
    """Emits canonical nodes for one source node, carrying its metadata over."""

    def __init__(self, graph: fx.Graph, env: dict, source: fx.Node):
        self.graph, self.env, self.source = graph, env, source

    def get(self, value):
        return fx.map_arg(value, lambda n: self.env[n])

    def shape(self, value=None) -> list[int]:
        node = self.source if value is None else value
        return [int(s) for s in node.meta["val"].shape]

    def emit(self, name: str, *args, meta_from: fx.Node | None = None) -> fx.Node:
        new = self.graph.call_function(ir.OPS[name], tuple(args))
        new.meta.update((meta_from or self.source).meta)
        new.meta[ir.META_OP] = name
        new.meta[ir.META_SOURCE] = str(self.source.target)
        return new

    def forward(self, value):
        """Fold the node into ``value`` (a canonical node of the new graph)."""
        return self.get(value)


def _is_scalar(value, number: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == number


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _conv(b: _Builder, a: dict):
    x = a["input"]
    padding = list(a["padding"])
    pad_h, pad_w = (padding * 2)[:2] if len(padding) == 1 else padding
    padding4 = [pad_h, pad_h, pad_w, pad_w]
    if (isinstance(x, fx.Node) and x.target in (aten.pad.default, aten.constant_pad_nd.default)
            and _foldable_pad(x)):
        pad_args = _arguments(x)
        left, right, top, bottom = pad_args["pad"]
        padding4 = [padding4[0] + top, padding4[1] + bottom, padding4[2] + left,
                    padding4[3] + right]
        x = pad_args["self"]
    stride = list(a["stride"]) * (2 if len(a["stride"]) == 1 else 1)
    dilation = list(a["dilation"]) * (2 if len(a["dilation"]) == 1 else 1)
    return b.emit("conv2d", b.get(x), b.get(a["weight"]), b.get(a["bias"]), tuple(stride),
                  tuple(padding4), tuple(dilation), a["groups"])


def _foldable_pad(node: fx.Node) -> bool:
    """A zero, constant, 2-D pad whose every user is a conv2d (so the conv can absorb it).

    Negative pads crop, and a crop followed by the conv's zero padding is not a smaller padding.
    """
    a = _arguments(node)
    if node.target == aten.pad.default and (a["mode"] != "constant" or a["value"] not in (None, 0, 0.0)):
        return False
    if node.target == aten.constant_pad_nd.default and a["value"] not in (None, 0, 0.0):
        return False
    return (len(a["pad"]) == 4 and min(a["pad"]) >= 0 and len(node.users) > 0
            and all(user.target == aten.conv2d.default and user.args[0] is node
                    for user in node.users))


def _pad(b: _Builder, a: dict):
    # Kept only until its conv users absorb it; dead-code elimination removes it afterwards.
    return b.graph.node_copy(b.source, lambda n: b.env[n]) if _foldable_pad(b.source) else None


def _binary(name: str, reverse: bool = False):
    def rule(b: _Builder, a: dict):
        lhs, rhs = a["self"], a["other"]
        if name == "div" and a.get("rounding_mode") is not None:
            return None
        # x / 1.0 is x only when no type promotion happens (an integer x gives a float).
        if (name in ("div", "mul") and _is_scalar(rhs, 1.0)
                and lhs.meta["val"].dtype == b.source.meta["val"].dtype):
            return b.forward(lhs)
        if name in ("add", "sub") and not _is_scalar(a.get("alpha", 1), 1):
            rhs = b.emit("mul", b.get(rhs), a["alpha"])
            return b.emit(name, b.get(lhs), rhs)
        return b.emit(name, b.get(lhs), b.get(rhs))
    return rule


def _unary(name: str):
    return lambda b, a: b.emit(name, b.get(a["self"]))


def _reshape(b: _Builder, a: dict):
    source = a.get("self", a.get("input"))
    if b.shape(source) == b.shape():
        return b.forward(source)
    return b.emit("reshape", b.get(source), tuple(b.shape()))


def _permute(b: _Builder, a: dict):
    rank = len(b.shape(a["self"]))
    dims = [_dim(d, rank) for d in a["dims"]]
    if dims == list(range(rank)):
        return b.forward(a["self"])
    return b.emit("permute", b.get(a["self"]), tuple(dims))


def _transpose(b: _Builder, a: dict):
    rank = len(b.shape(a["self"]))
    dims = list(range(rank))
    i, j = _dim(a["dim0"], rank), _dim(a["dim1"], rank)
    dims[i], dims[j] = dims[j], dims[i]
    if i == j:
        return b.forward(a["self"])
    return b.emit("permute", b.get(a["self"]), tuple(dims))


def _expand(b: _Builder, a: dict):
    if b.shape(a["self"]) == b.shape():
        return b.forward(a["self"])
    return b.emit("expand", b.get(a["self"]), tuple(b.shape()))


def _slice(b: _Builder, a: dict):
    shape = b.shape(a["self"])
    dim = _dim(a["dim"], len(shape))
    start, end, step = slice(a["start"], a["end"], a["step"]).indices(shape[dim])
    if (start, end, step) == (0, shape[dim], 1):
        return b.forward(a["self"])
    return b.emit("slice", b.get(a["self"]), dim, start, end, step)


def _split(b: _Builder, a: dict):
    shape = b.shape(a["self"])
    dim = _dim(a["dim"], len(shape))
    if "chunks" in a:
        size = -(-shape[dim] // a["chunks"])
    else:
        size = a.get("split_size", a.get("split_sizes"))
    if isinstance(size, int):
        sizes = [min(size, shape[dim] - start) for start in range(0, shape[dim], size)]
    else:
        sizes = list(size)
    return b.emit("split", b.get(a["self"]), tuple(sizes), dim)


def _getitem(b: _Builder, a: dict):
    container, index = b.source.args
    if ir.op_name(b.env[container]) != "split":
        return None
    return b.emit("getitem", b.get(container), index)


def _cat(b: _Builder, a: dict):
    rank = len(b.shape())
    return b.emit("cat", b.get(list(a["tensors"])), _dim(a["dim"], rank))


def _cast(b: _Builder, a: dict):
    source = a["self"]
    dtype = a.get("dtype")
    if dtype is None or source.meta["val"].dtype == dtype:
        return b.forward(source)
    return b.emit("cast", b.get(source), dtype)


def _dropout(b: _Builder, a: dict):
    if a["p"] == 0 or not a["train"]:
        return b.forward(a["input"])
    return None


def _attention(b: _Builder, a: dict):
    if a["dropout_p"] != 0 or a["is_causal"] or a.get("enable_gqa"):
        return None
    return b.emit("attention", b.get(a["query"]), b.get(a["key"]), b.get(a["value"]),
                  b.get(a["attn_mask"]), a["scale"])


def _upsample(b: _Builder, a: dict):
    height, width = b.shape()[-2:]
    return b.emit("upsample_nearest", b.get(a["input"]), height, width)


def _factory(b: _Builder, a: dict):
    val = b.source.meta["val"]
    device = a.get("device") or val.device
    if b.source.target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        start = a.get("start", 0)
        return b.emit("arange", start, a["end"], a.get("step", 1) or 1, val.dtype, device)
    value = {aten.ones.default: 1.0, aten.zeros.default: 0.0}.get(b.source.target)
    if value is None:
        value = a["fill_value"]
    return b.emit("full", tuple(b.shape()), value, val.dtype, device)


_RULES = {
    aten.conv2d.default: _conv,
    aten.pad.default: _pad,
    aten.constant_pad_nd.default: _pad,
    aten.group_norm.default: lambda b, a: b.emit(
        "group_norm", b.get(a["input"]), a["num_groups"], b.get(a["weight"]), b.get(a["bias"]),
        a["eps"]),
    aten.layer_norm.default: lambda b, a: b.emit(
        "layer_norm", b.get(a["input"]), tuple(a["normalized_shape"]), b.get(a["weight"]),
        b.get(a["bias"]), a["eps"]),
    aten.scaled_dot_product_attention.default: _attention,
    aten.linear.default: lambda b, a: b.emit(
        "linear", b.get(a["input"]), b.get(a["weight"]), b.get(a["bias"])),
    aten.upsample_nearest2d.vec: _upsample,
    aten.upsample_nearest2d.default: _upsample,
    aten.silu.default: lambda b, a: b.emit("silu", b.get(a["self"])),
    aten.gelu.default: lambda b, a: b.emit("gelu", b.get(a["self"]), a["approximate"]),
    aten.add.Tensor: _binary("add"), aten.add.Scalar: _binary("add"),
    aten.sub.Tensor: _binary("sub"), aten.sub.Scalar: _binary("sub"),
    aten.mul.Tensor: _binary("mul"), aten.mul.Scalar: _binary("mul"),
    aten.div.Tensor: _binary("div"), aten.div.Scalar: _binary("div"),
    aten.div.Tensor_mode: _binary("div"),
    aten.pow.Tensor_Scalar: lambda b, a: b.emit("pow", b.get(a["self"]), a["exponent"]),
    **{getattr(aten, name).default: _unary(name) for name in ir.UNARY},
    aten.cat.default: _cat, aten.concat.default: _cat,
    aten.view.default: _reshape, aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape, aten.flatten.using_ints: _reshape,
    aten.unflatten.int: _reshape, aten.unsqueeze.default: _reshape,
    aten.squeeze.dim: _reshape, aten.squeeze.dims: _reshape, aten.squeeze.default: _reshape,
    aten.permute.default: _permute, aten.transpose.int: _transpose,
    aten.expand.default: _expand,
    aten.slice.Tensor: _slice,
    aten.chunk.default: _split, aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    operator.getitem: _getitem,
    aten.to.dtype: _cast, aten._to_copy.default: _cast, aten.to.dtype_layout: _cast,
    aten.dropout.default: _dropout,
    aten.contiguous.default: lambda b, a: b.forward(a["self"]),
    aten.clone.default: lambda b, a: b.forward(a["self"]),
    aten.alias.default: lambda b, a: b.forward(a["self"]),
    aten.detach.default: lambda b, a: b.forward(a["self"]),
    aten._assert_tensor_metadata.default: lambda b, a: _DROPPED,
    aten.arange.default: _factory, aten.arange.start: _factory,
    aten.arange.start_step: _factory, aten.ones.default: _factory,
    aten.zeros.default: _factory, aten.full.default: _factory,
}

# What a side-effect-only node (a metadata assert) maps to: nothing in the new graph uses it.
_DROPPED = object()
