"""Inspection: show a captured or canonical U-Net graph as a table, JSON, DOT or SVG.

Why: every later pass (sparsify, cache, fuse) decides from the per-node facts that ``analyze``
records (domain, level, MACs, invariance, module path). Seeing them for a real model is how one
checks that a new architecture is understood before trusting a sparse engine built from it.

The tooling is built in three layers, so later stages (``--stage sparse`` with a mask) plug in
by adding keys rather than new code paths:

1. ``node_rows(gm)``: one plain dict per graph node (the ``NODE_KEYS``; a later stage may add
   keys such as ``"sparse"``). Works on any stage: keys whose metadata a stage lacks are None.
2. ``report(gm, model=..., stage=..., frontend=...)``: the whole dump as one JSON-ready dict,
   ``{"model", "stage", "frontend", "inputs", "summary", "nodes"}``; its form is ``JSON_SCHEMA``.
3. ``render(report, fmt)``: that dict as ``text``, ``json``, ``dot`` or ``svg``.

``dump(...)`` is the Python form of ``fisedit-compiler dump``; ``to_networkx(gm)`` gives the
graph as a ``networkx.DiGraph`` for ad-hoc analysis.

Parameters (``get_attr`` nodes) appear in the JSON nodes and in the networkx graph, but not in
the text table or the DOT drawing, where they would double the node count and say nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx

from . import ir, zoo
from .checks import check_choice, check_inputs_dict, check_int
from .compiler import capture
from .compiler.pipeline import STAGES as COMPILE_STAGES
from .compiler.pipeline import Program, trace
from .errors import FiseditError
from .execution.plan import (mask_from_box, mask_to_latent, parse_box, read_mask_png,
                             validate_mask)
from .graph_keys import LEVELS
from .passes.analyze import module_path
from .pipeline_files import load_unet, read_json_object

FORMATS = ("text", "json", "dot", "svg")
# dump's largest batch: the graph's ops do not depend on it, and a huge one fails to allocate.
MAX_DUMP_BATCH = 256
DOMAIN_KINDS = ("spatial", "tokens", "global", "opaque")
NODE_KEYS = ("name", "kind", "op", "source", "shape", "dtype", "module", "domain", "level",
             "invariant", "attention", "macs", "unknown", "inputs")

_SHAPE = {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0},
          "description": "tensor shape; null for non-tensor values (a split's tuple, output)"}
_COUNT = {"type": "integer", "minimum": 0}
STAGES = COMPILE_STAGES + ("sparse",)
_COUNTS = {"type": "object", "additionalProperties": _COUNT}


def _tally(**extra) -> dict:
    """Schema of {"nodes": operations, "macs": their MACs, **extra}."""
    return {"type": "object", "required": ["nodes", "macs", *extra],
            "properties": {"nodes": _COUNT, "macs": _COUNT, **extra}}


# The form of ``report()``, i.e. of ``--format json``. The descriptions document the fields; the
# schema uses only type, enum, minimum, properties, required, items and additionalProperties.
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:fisedit-compiler:dump",
    "title": "fisedit-compiler dump",
    "description": (
        "One U-Net graph at one stage. Node facts that a stage does not compute (domain, level, "
        "MACs, ... at the captured stage) are null; the sparse stage adds keys to nodes and "
        "summary (sparse, sparse_macs, cache_write; summary.sparse), no stage any other. Counts "
        "of nodes in summary cover operations (call_function nodes) only."),
    "type": "object",
    "required": ["model", "stage", "frontend", "inputs", "summary", "nodes"],
    "properties": {
        "model": {"type": "string", "description": "zoo model name, or the pipeline folder"},
        "stage": {"enum": list(STAGES)},
        "frontend": {"enum": list(capture.FRONTENDS)},
        "inputs": {
            "type": "object", "description": "the graph's user inputs, by placeholder name",
            "additionalProperties": {"type": "object", "required": ["shape", "dtype"],
                                     "properties": {"shape": _SHAPE, "dtype": {"type": "string"}}},
        },
        "summary": {
            "type": "object",
            "required": ["nodes", "ops", "unknown_ops", "levels", "domains", "attention", "macs"],
            "properties": {
                "nodes": {**_COUNT,
                          "description": "all graph nodes, parameters and inputs included"},
                "ops": {**_COUNTS, "description": "operations by op name: canonical names at "
                        "the canonical stage (ATen names for unknown ops), ATen names before"},
                "unknown_ops": {**_COUNTS, "description": "ops outside the canonical set"},
                "levels": {
                    "type": "object",
                    "description": "spatial levels by index as a string, finest (the latent) "
                                   "first; empty before analysis",
                    "additionalProperties": _tally(size={
                        "type": "array", "items": {"type": "integer", "minimum": 1},
                        "description": "[H, W]"}),
                },
                "domains": {"type": "object", "description": "by domain kind; empty before "
                            "analysis", "additionalProperties": _tally()},
                "attention": {"type": ["object", "null"], "required": ["self", "cross"],
                              "properties": {"self": _COUNT, "cross": _COUNT}},
                "macs": {"type": ["integer", "null"], "minimum": 0,
                         "description": "dense multiply-accumulates of one U-Net call"},
                "sparse": {
                    "type": "object", "description": "(sparse stage) SparseEngine.stats of the "
                    "edit's plan: the MACs of one edit call",
                    "required": ["dense_macs", "sparse_macs", "ideal_macs", "mask_fraction",
                                 "levels"],
                    "additionalProperties": False,
                    "properties": {
                        "dense_macs": _COUNT,
                        "sparse_macs": {**_COUNT, "description": "what the sparse ops compute, "
                                        "halos and tiles included"},
                        "ideal_macs": {**_COUNT, "description": "the mask's share of each "
                                       "node's dense MACs: no halo, no tile rounding"},
                        "mask_fraction": {"type": "number", "minimum": 0,
                                          "description": "the mask's share of the latent"},
                        "levels": {"type": "array", "description": "the plan per level, finest "
                                   "first", "items": {
                                       "type": "object", "additionalProperties": False,
                                       "required": ["level", "size", "tile", "dense",
                                                    "fraction", "tiles"],
                                       "properties": {
                                           "level": _COUNT,
                                           "size": {"type": "array", "items": _COUNT,
                                                    "description": "[H, W]"},
                                           "tile": _COUNT,
                                           "dense": {"type": "boolean", "description":
                                                     "the level runs dense"},
                                           "fraction": {"type": "number", "minimum": 0,
                                                        "description": "active share"},
                                           "tiles": {**_COUNT, "description": "active "
                                                     "tiles"}}}},
                    },
                },
            },
            "additionalProperties": False,
        },
        "nodes": {"type": "array", "description": "graph nodes in execution order", "items": {
            "type": "object",
            "required": list(NODE_KEYS),
            "properties": {
                "name": {"type": "string", "description": "fx node name, unique"},
                "kind": {"enum": ["placeholder", "get_attr", "call_function", "call_method",
                                  "call_module", "output"], "description": "fx node.op"},
                "op": {"type": "string", "description": "canonical op name; the ATen target "
                       "for captured-stage or unknown ops; the kind for non-operations"},
                "source": {"type": ["string", "null"],
                           "description": "the ATen op a canonical node came from"},
                "shape": _SHAPE,
                "dtype": {"type": ["string", "null"]},
                "module": {"type": "string", "description": "dotted module path; '' for root"},
                "domain": {"enum": [*DOMAIN_KINDS, None]},
                "level": {"type": ["integer", "null"], "minimum": 0},
                "invariant": {"enum": ["step", "prompt", "constant", None],
                              "description": "how rarely the value changes; null: with the "
                                             "sample (or not analyzed)"},
                "attention": {"enum": ["self", "cross", None]},
                "macs": {"type": ["integer", "null"], "minimum": 0},
                "unknown": {"type": "boolean"},
                "inputs": {"type": "array", "items": {"type": "string"},
                           "description": "names of the nodes this one reads"},
                "sparse": {"enum": ["sparse", "dense", "global", "input", None],
                           "description": "(sparse stage) how the edit runs the node"},
                "sparse_macs": {"type": ["integer", "null"], "minimum": 0,
                                "description": "(sparse stage) its MACs in the edit"},
                "cache_write": {"type": "array", "items": {"type": "string"},
                                "description": "(sparse stage) the cache keys recorded from "
                                               "it, which the edit graph reads back"},
            },
            "additionalProperties": False,
        }},
    },
}


# ------------------------------------------------------------------------------ rows and report

def node_rows(gm: fx.GraphModule) -> list[dict]:
    """One dict per node of ``gm`` (keys ``NODE_KEYS``), in graph order."""
    _check_graph(gm)
    return [_row(node) for node in gm.graph.nodes]


# How to get a graph from what is easily passed instead; a U-Net module is the usual mistake.
_TRACE_HINT = ("capture it first: fisedit_compiler.compiler.pipeline.trace(unet, "
               "fisedit_compiler.zoo.example_inputs(unet)) gives the canonical graph "
               "(stage=\"captured\" the ATen graph), or use inspect.dump for a zoo model or a "
               "saved pipeline")


def _check_graph(gm) -> None:
    """``gm`` is an fx.GraphModule: anything else fails deep inside (no ``.graph`` or no
    ``.meta``) with an AttributeError that names neither the argument nor the fix."""
    if isinstance(gm, fx.GraphModule):
        return
    if isinstance(gm, Program):
        hint = "pass program.canonical, the program's canonical graph"
    elif isinstance(gm, torch.nn.Module):
        hint = f"a module is not a graph; {_TRACE_HINT}"
    else:
        hint = f"to inspect a U-Net, {_TRACE_HINT}"
    raise FiseditError(f"expected a captured or canonical U-Net graph (a torch.fx.GraphModule), "
                       f"got {type(gm).__name__}; {hint}")


def _check_label(model) -> None:
    """The ``model`` label is a str, as ``JSON_SCHEMA`` says (a U-Net passed here by mistake
    would otherwise end up in the report as its repr)."""
    if not isinstance(model, str):
        raise FiseditError(f"model must be a str naming the model (a zoo name or a pipeline "
                           f"folder), got {type(model).__name__}")


def _row(node: fx.Node) -> dict:
    value = node.meta.get("val")
    tensor = isinstance(value, torch.Tensor)
    domain = node.meta.get(ir.META_DOMAIN)
    return {
        "name": node.name,
        "kind": node.op,
        "op": _op(node),
        "source": node.meta.get(ir.META_SOURCE),
        "shape": [int(s) for s in value.shape] if tensor else None,
        "dtype": str(value.dtype).removeprefix("torch.") if tensor else None,
        "module": node.meta.get(ir.META_MODULE, module_path(node)),
        "domain": domain.kind if domain else None,
        "level": domain.level if domain else None,
        "invariant": node.meta.get(ir.META_INVARIANT),
        "attention": node.meta.get(ir.META_ATTN_KIND),
        "macs": node.meta.get(ir.META_MACS),
        "unknown": bool(node.meta.get(ir.META_UNKNOWN, False)),
        "inputs": [source.name for source in node.all_input_nodes],
    }


def _op(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    name = ir.op_name(node)
    if name is not None:
        return name
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(
        target, "__name__", str(target))


def summarize(rows: list[dict], level_sizes=()) -> dict:
    """Counts of ``rows`` by op, level and domain, attention kinds and total MACs.

    ``level_sizes`` is the (H, W) of each level (``gm.meta["fc_levels"]``). Level and domain
    tallies count operations only, and are empty for an unanalyzed (captured) graph.
    """
    _check_rows(rows, level_sizes)
    calls = [row for row in rows if row["kind"] == "call_function"]
    analyzed = any(row["domain"] is not None for row in rows)
    levels = {str(level): {"size": list(size), "nodes": 0, "macs": 0}
              for level, size in enumerate(level_sizes)}
    domains = {kind: {"nodes": 0, "macs": 0} for kind in DOMAIN_KINDS} if analyzed else {}
    if analyzed:
        for row in calls:
            tallies = [domains[row["domain"]]]
            if row["level"] is not None:
                tallies.append(levels[str(row["level"])])
            for tally in tallies:
                tally["nodes"] += 1
                tally["macs"] += row["macs"] or 0
    kinds = Counter(row["attention"] for row in calls if row["attention"])
    return {
        "nodes": len(rows),
        "ops": dict(Counter(row["op"] for row in calls).most_common()),
        "unknown_ops": dict(Counter(row["op"] for row in calls if row["unknown"]).most_common()),
        "levels": levels,
        "domains": domains,
        "attention": {"self": kinds["self"], "cross": kinds["cross"]} if analyzed else None,
        "macs": sum(row["macs"] or 0 for row in calls) if analyzed else None,
    }


def _check_rows(rows, level_sizes) -> None:
    """``rows`` are ``node_rows``' dicts and ``level_sizes`` has a size for each of their levels
    (a missing size would otherwise surface as a KeyError on the level's index)."""
    if not isinstance(rows, list) or not all(
            isinstance(row, dict) and set(NODE_KEYS) <= set(row) for row in rows):
        raise FiseditError(f"summarize takes the list of row dicts that node_rows(gm) returns, "
                           f"got {type(rows).__name__}")
    if not isinstance(level_sizes, (list, tuple)) or not all(
            isinstance(size, (list, tuple)) and len(size) == 2 for size in level_sizes):
        raise FiseditError(f"level_sizes must be a list of (H, W) pairs, one per level, as "
                           f"gm.meta[{LEVELS!r}] holds; got {level_sizes!r}")
    levels = [row["level"] for row in rows if row["level"] is not None]
    if levels and max(levels) >= len(level_sizes):
        raise FiseditError(f"the rows have spatial levels up to {max(levels)} but level_sizes "
                           f"gives {len(level_sizes)} sizes; pass the graph's "
                           f"gm.meta[{LEVELS!r}]")


def report(gm: fx.GraphModule, *, model: str, stage: str, frontend: str) -> dict:
    """The dump of ``gm`` as one JSON-ready dict (``JSON_SCHEMA``); ``model``, ``stage`` and
    ``frontend`` only label it, and must be what the schema allows."""
    _check_label(model)
    check_choice("stage", stage, STAGES)
    check_choice("frontend", frontend, capture.FRONTENDS)
    rows = node_rows(gm)
    return {
        "model": model,
        "stage": stage,
        "frontend": frontend,
        "inputs": {row["name"]: {"shape": row["shape"], "dtype": row["dtype"]}
                   for row in rows if row["kind"] == "placeholder"},
        "summary": summarize(rows, gm.meta.get(LEVELS, ())),
        "nodes": rows,
    }


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """``gm`` as a DiGraph: one node per fx node (by name) carrying its row's facts as attributes
    (op, shape, dtype, domain, level, macs, module, ...), one edge per data dependency."""
    graph = nx.DiGraph()
    for row in node_rows(gm):
        graph.add_node(row["name"], **{k: v for k, v in row.items() if k not in ("name", "inputs")})
        graph.add_edges_from((source, row["name"]) for source in row["inputs"])
    return graph


# ------------------------------------------------------------------------------ rendering

def render(report: dict, fmt: str) -> str:
    """``report`` (from ``report()``) as ``fmt``: one of ``FORMATS``."""
    renderers = {"text": _text, "json": _json, "dot": _dot, "svg": _svg}
    _check_format(fmt)
    _check_report(report)
    return renderers[fmt](report)


def _check_report(report) -> None:
    """``report`` is ``report()``'s dict (or one read back from its JSON): the renderers index
    its keys, so anything else would fail with a bare KeyError or TypeError."""
    if isinstance(report, fx.GraphModule):
        raise FiseditError("render takes a report, not a graph: call "
                           "inspect.report(gm, model=..., stage=..., frontend=...) first")
    if not isinstance(report, dict):
        raise FiseditError(f"render takes the dict that inspect.report() returns, got "
                           f"{type(report).__name__}")
    missing = [key for key in JSON_SCHEMA["required"] if key not in report]
    if missing:
        raise FiseditError(f"the report lacks {', '.join(map(repr, missing))}; render takes the "
                           f"dict that inspect.report() (or sparse_report()) returns, unchanged")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FiseditError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _json(report: dict) -> str:
    return json.dumps(report, indent=1) + "\n"


def _si(count: int) -> str:
    """A count in engineering units: 4718592 -> "4.72M"."""
    for scale, unit in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    """Rows as aligned columns; columns ``right`` (counts) are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
            for line in (header, *rows)]


def _domain_cell(row: dict) -> str:
    if row["domain"] is None:
        return "-"
    if row["level"] is not None:
        return f"{row['domain']}@L{row['level']}"
    return f"{row['domain']}:{row['invariant']}" if row["invariant"] else row["domain"]


def _op_cell(row: dict) -> str:
    if row["unknown"]:
        return f"{row['op']} (UNKNOWN)"
    return f"{row['op']}({row['attention']})" if row["attention"] else row["op"]


def _shape_cell(shape) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _level_cell(level: dict) -> str:
    share = "dense" if level["dense"] else f"{level['fraction']:.1%}"
    return f"L{level['level']} {share}"


def _text(report: dict) -> str:
    summary = report["summary"]
    analyzed = summary["macs"] is not None
    rows = [row for row in report["nodes"] if row["kind"] != "get_attr"]
    lines = [f"model {report['model']}  stage {report['stage']}  frontend {report['frontend']}",
             "inputs: " + ", ".join(f"{name} {spec['dtype']}[{_shape_cell(spec['shape'])}]"
                                    for name, spec in report["inputs"].items())]
    if analyzed:  # and so canonicalized: unknown ops are flagged
        unknown = summary["unknown_ops"]
        lines += [
            "levels: " + ", ".join(f"L{level} {_shape_cell(tally['size'])}"
                                   for level, tally in summary["levels"].items()),
            f"attention: {summary['attention']['self']} self, "
            f"{summary['attention']['cross']} cross",
            f"MACs: {_si(summary['macs'])} ({summary['macs']})",
            "unknown ops: " + (", ".join(f"{op} x{n}" for op, n in unknown.items())
                               if unknown else "none")]
    sparse = summary.get("sparse")
    if sparse:
        lines += [f"edit mask {sparse['mask_fraction']:.2%}: MACs dense {_si(sparse['dense_macs'])}, "
                  f"sparse {_si(sparse['sparse_macs'])}, ideal {_si(sparse['ideal_macs'])}",
                  "levels: " + ", ".join(_level_cell(level) for level in sparse["levels"])]
    lines += ["", f"Nodes ({len(rows)} shown; {summary['nodes'] - len(rows)} parameters omitted)"]
    header = ["name", "op", "shape", "dtype", "domain", "MACs", "module"]
    cells = [[row["name"], _op_cell(row), _shape_cell(row["shape"]), row["dtype"] or "-",
              _domain_cell(row), _si(row["macs"]) if row["macs"] else "", row["module"]]
             for row in rows]
    if sparse:
        header += ["edit", "sparse MACs", "cache"]
        for cell, row in zip(cells, rows):
            cell += [row["sparse"] or "", _si(row["sparse_macs"]) if row["sparse_macs"] else "",
                     "cache_write" if row["cache_write"] else ""]
    lines += _table(header, cells, right=(5,))
    op_macs = Counter()
    for row in rows:
        op_macs[row["op"]] += row["macs"] or 0
    lines += ["", "By op"] + _table(
        ["op", "count", "MACs"],
        [[op, str(count), _si(op_macs[op]) if analyzed else "-"]
         for op, count in summary["ops"].items()],
        right=(1, 2))
    if analyzed:
        by_level = [[f"L{level}", _shape_cell(tally["size"]), str(tally["nodes"]),
                     _si(tally["macs"])] for level, tally in summary["levels"].items()]
        by_level += [[kind, "-", str(tally["nodes"]), _si(tally["macs"])]
                     for kind, tally in summary["domains"].items() if kind in ("global", "opaque")]
        lines += ["", "By level"] + _table(["level", "size", "nodes", "MACs"], by_level,
                                           right=(2, 3))
    return "\n".join(lines) + "\n"


# Fill colours: per level for positional domains (finest level lightest), one each for the rest.
_SPATIAL_COLORS = ("#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5")
_TOKEN_COLORS = ("#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45")
_GLOBAL_COLOR, _OPAQUE_COLOR, _UNKNOWN_COLOR, _PLAIN_COLOR = (
    "#fff2cc", "#fdae6b", "#ff4d4d", "#ffffff")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _quote(text: str) -> str:
    return f'"{_escape(text)}"'


def _block(module: str) -> str:
    """The top-level block of a module path: "down_blocks.0.resnets.1.conv1" -> "down_blocks.0",
    "time_embedding.linear_1" -> "time_embedding", "" (the root) -> ""."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def _node_color(row: dict) -> str:
    if row["unknown"]:
        return _UNKNOWN_COLOR
    if row["domain"] == "spatial":
        return _SPATIAL_COLORS[row["level"] % len(_SPATIAL_COLORS)]
    if row["domain"] == "tokens":
        return _TOKEN_COLORS[row["level"] % len(_TOKEN_COLORS)]
    return {"global": _GLOBAL_COLOR, "opaque": _OPAQUE_COLOR}.get(row["domain"], _PLAIN_COLOR)


def _dot_node(row: dict) -> str:
    label = "\\n".join(_escape(part) for part in (
        row["name"], _op_cell(row), _shape_cell(row["shape"]), _domain_cell(row)))
    attrs = [f'label="{label}"', f'fillcolor="{_node_color(row)}"',
             f"tooltip={_quote(row['module'] or '(root)')}"]
    if row["unknown"]:
        attrs += ['color="red"', "penwidth=3"]
    if row["kind"] in ("placeholder", "output"):
        attrs.append("shape=ellipse")
    return f"{_quote(row['name'])} [{', '.join(attrs)}];"


def _dot(report: dict) -> str:
    """Graphviz DOT: operations, inputs and output, clustered by top-level block (the root's
    nodes outside any cluster) and coloured by domain and level; unknown ops red."""
    rows = [row for row in report["nodes"] if row["kind"] != "get_attr"]
    shown = {row["name"] for row in rows}
    blocks: dict[str, list[dict]] = {}
    for row in rows:
        blocks.setdefault(_block(row["module"]), []).append(row)
    title = f"{report['model']} ({report['stage']}, {report['frontend']})"
    lines = [f"digraph {_quote(report['model'])} {{",
             f"  label={_quote(title)}; labelloc=t; rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    for block, members in blocks.items():
        indent = "    " if block else "  "
        if block:
            lines += [f"  subgraph {_quote('cluster_' + block)} {{",
                      f'    label={_quote(block)}; style="rounded"; color="gray50";']
        lines += [indent + _dot_node(row) for row in members]
        if block:
            lines.append("  }")
    lines += [f"  {_quote(source)} -> {_quote(row['name'])};"
              for row in rows for source in row["inputs"] if source in shown]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_program() -> str:
    program = shutil.which("dot")
    if program is None:
        raise FiseditError(
            "SVG output needs Graphviz's `dot` program, which is not installed; install it "
            "(apt-get install graphviz), or write the dot format and render it elsewhere")
    return program


def _svg(report: dict) -> str:
    done = subprocess.run([_dot_program(), "-Tsvg"], input=_dot(report), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise FiseditError(f"dot -Tsvg failed: {done.stderr.strip()}")
    return done.stdout


# ------------------------------------------------------------------------------ entry points

def pipeline_unet(path):
    """The U-Net of the diffusers pipeline saved (``save_pretrained``) in folder ``path``,
    loaded alone (``pipeline_files.load_unet``, which reports a missing folder, index or
    U-Net before loading): the other components are not needed to inspect it."""
    _check_pipeline_folder(path)
    return load_unet(path)


def sparse_report(unet, inputs, mask, *, model: str, frontend: str,
                  config=None) -> dict:
    """The ``sparse`` stage: the canonical graph with, per node, how an edit under ``mask`` runs
    it (``sparse``: "sparse", "dense", "global" or "input"), its sparse MACs and the cache keys
    recorded from it (``cache_write``; the edit graph reads them back); the summary gains
    ``engine.stats(plan)`` under ``"sparse"``."""
    from .config import SparseConfig
    from .engine.engine import SparseEngine, node_macs

    # Everything checked before engine.program, which captures and compiles (seconds to minutes).
    _check_label(model)
    check_choice("frontend", frontend, capture.FRONTENDS)
    check_inputs_dict("sparse_report's inputs", inputs)
    engine = SparseEngine(unet, config or SparseConfig(frontend=frontend))  # checks both
    config = engine.config
    if config.frontend != frontend:
        # The engine captures with config.frontend: a different frontend= would only mislabel.
        raise FiseditError(f"frontend {frontend!r} differs from config.frontend "
                           f"{config.frontend!r}, which the engine captures with; pass the same "
                           f"frontend, or leave config out")
    sample = inputs.get("sample")
    latent = (tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.dim() == 4
              else None)        # the inputs themselves are checked by engine.program
    validate_mask(mask, latent)
    program = engine.program(inputs)
    plan = engine.plan(mask)
    result = report(program.canonical, model=model, stage="sparse", frontend=frontend)
    by_name = {row["name"]: row for row in node_macs(program, plan, config)}
    writes = program.cache_writes
    for row in result["nodes"]:
        row["sparse"] = by_name[row["name"]]["mode"] or None
        row["sparse_macs"] = by_name[row["name"]]["sparse_macs"]
        row["cache_write"] = writes.get(row["name"], [])
    result["summary"]["sparse"] = engine.stats(plan)
    return result


def _check_path(name: str, value, what: str, hint: str) -> None:
    """``value`` is a file-system path (str or os.PathLike), or a FiseditError saying it takes
    ``what``: pathlib's own TypeError names neither the argument nor the fix."""
    if not isinstance(value, (str, os.PathLike)):
        raise FiseditError(f"{name} must be {what}, as a str or Path, got "
                           f"{type(value).__name__}; {hint}")


def _configured_latent_size(model: str | None, pipeline) -> tuple[int, int] | None:
    """The latent size ``zoo.example_inputs`` will use, read from the zoo's or the saved
    U-Net's config without building it; None where the config does not tell it."""
    config = (zoo.config(model) if model is not None
              else read_json_object(Path(pipeline) / "unet" / "config.json") or {})
    return capture.configured_latent_size(config)


def _check_pipeline_folder(path) -> None:
    _check_path("pipeline", path, "the folder a diffusers pipeline was saved to "
                "(save_pretrained)", f"for a loaded pipeline, inspect pipe.unet: {_TRACE_HINT}")


def dump(model: str | None = None, *, pipeline=None, fmt: str = "text",
         stage: str = "canonical", frontend: str = "export", batch: int = 2,
         mask: str | None = None, mask_box: str | None = None) -> str:
    """What ``fisedit-compiler dump`` prints: the graph of zoo ``model`` or of the U-Net of the
    pipeline saved in folder ``pipeline`` (exactly one), called on ``zoo.example_inputs`` of
    ``batch`` samples, traced by ``frontend`` up to ``stage`` and rendered as ``fmt``."""
    if (model is None) == (pipeline is None):
        raise FiseditError("dump needs exactly one of a zoo model name or a pipeline folder")
    if model is not None and not isinstance(model, str):
        raise FiseditError(f"model must be a zoo model name ({', '.join(zoo.MODEL_NAMES)}), got "
                           f"{type(model).__name__}; to inspect a U-Net object, {_TRACE_HINT}")
    if pipeline is not None:
        _check_pipeline_folder(pipeline)
    if mask is not None:
        _check_path("mask", mask, "the path of a PNG (white = edit)",
                    "for a mask tensor, call inspect.sparse_report(unet, inputs, mask, ...)")
    if mask_box is not None and not isinstance(mask_box, str):
        # parse_box reads the command line's text; a tuple would fail in str.split.
        raise FiseditError(f"mask_box must be a str \"x0,y0,x1,y1\" in fractions of the width "
                           f"and height (e.g. \"0,0,0.5,0.5\"), got {type(mask_box).__name__} "
                           f"{mask_box!r}; for a tuple, pass \",\".join(map(str, box))")
    _check_format(fmt)  # fail before the capture, which takes seconds to minutes
    if fmt == "svg":
        _dot_program()
    batch = check_int("batch", batch, minimum=1, maximum=MAX_DUMP_BATCH)
    if stage not in STAGES:
        raise FiseditError(f"unknown stage {stage!r}; choose one of {STAGES}")
    check_choice("frontend", frontend, capture.FRONTENDS)
    if (stage == "sparse") != (mask is not None or mask_box is not None):
        raise FiseditError("--stage sparse needs exactly one of --mask PNG or --mask-box "
                           "x0,y0,x1,y1, and the masks need --stage sparse")
    if mask is not None and mask_box is not None:
        raise FiseditError("give either --mask or --mask-box, not both")
    # The mask, read and sized before the U-Net is built and captured (seconds to minutes),
    # where the config tells the latent size.
    pixels = (read_mask_png(mask, remedy="or pass --mask-box x0,y0,x1,y1 instead")
              if mask is not None else None)
    if mask_box is not None:
        parse_box(mask_box)
    configured = _configured_latent_size(model, pipeline)
    if pixels is not None and configured is not None:
        mask_to_latent(pixels, configured, f"the mask {mask}")
    unet = zoo.unet(model) if model is not None else pipeline_unet(pipeline)
    inputs = zoo.example_inputs(unet, batch=batch)
    label = model if model is not None else str(pipeline)
    if stage == "sparse":
        size = tuple(inputs["sample"].shape[-2:])
        edit_mask = (mask_to_latent(pixels, size, f"the mask {mask}") if pixels is not None
                     else mask_from_box(mask_box, size))
        return render(sparse_report(unet, inputs, edit_mask, model=label, frontend=frontend), fmt)
    gm = trace(unet, inputs, frontend, stage)
    return render(report(gm, model=label, stage=stage, frontend=frontend), fmt)
