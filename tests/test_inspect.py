"""inspect: rows, summary, the JSON schema, and the text / JSON / DOT / SVG / networkx views."""

import json
import shutil
import warnings

import networkx as nx
import pytest
import torch
import torch.nn as nn

pydot = pytest.importorskip("pydot")    # a dev dependency; the GPU machine's image lacks it

from fisedit_compiler import inspect, ir, zoo
from fisedit_compiler.compiler import capture
from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution.plan import mask_from_box
from fisedit_compiler.passes.analyze import analyze
from fisedit_compiler.passes.canonicalize import canonicalize

# ------------------------------------------------------------------ a minimal JSON Schema validator

# The draft 2020-12 keywords JSON_SCHEMA may use; the validator refuses any other, so the schema
# cannot silently rely on a keyword nobody checks.
KEYWORDS = {"$schema", "$id", "title", "description", "type", "enum", "minimum", "properties",
            "required", "additionalProperties", "items"}
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def is_type(value, name):
    if name in ("integer", "number"):
        kinds = int if name == "integer" else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    return isinstance(value, TYPES[name])


def validate(value, schema, path="$"):
    """Raise AssertionError, naming the path, where ``value`` breaks ``schema``."""
    assert set(schema) <= KEYWORDS, f"{path}: unsupported keywords {set(schema) - KEYWORDS}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(is_type(value, t) for t in types), f"{path}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "minimum" in schema and is_type(value, "number"):
        assert value >= schema["minimum"], f"{path}: {value} < {schema['minimum']}"
    if isinstance(value, dict):
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{path}: missing {missing}"
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                validate(item, properties[key], f"{path}.{key}")
            else:
                assert extra is not False, f"{path}: unexpected key {key!r}"
                if isinstance(extra, dict):
                    validate(item, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{index}]")


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def canonical(traced):
    return traced("sd15-tiny").gm


@pytest.fixture(scope="module")
def canonical_report(canonical):
    return inspect.report(canonical, model="sd15-tiny", stage="canonical", frontend="export")


@pytest.fixture(scope="module")
def captured_report(traced):
    gm = traced("sd15-tiny", stage="captured").gm
    return inspect.report(gm, model="sd15-tiny", stage="captured", frontend="export")


class WithUnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample):
        return self.conv(torch.cumsum(sample, dim=1))


@pytest.fixture(scope="module")
def unknown_report():
    program = torch.export.export(WithUnknownOp().eval(), (torch.randn(2, 4, 8, 8),), strict=False)
    gm = analyze(canonicalize(capture.program_to_graph_module(program)))
    return inspect.report(gm, model="with-cumsum", stage="canonical", frontend="export")


def row(report, name):
    return next(r for r in report["nodes"] if r["name"] == name)


# ------------------------------------------------------------------ rows, summary, JSON

def test_rows_describe_nodes(canonical, canonical_report):
    rows = canonical_report["nodes"]
    assert [r["name"] for r in rows] == [n.name for n in canonical.graph.nodes]
    assert all(tuple(r) == inspect.NODE_KEYS for r in rows)
    conv_in = next(r for r in rows if r["module"] == "conv_in" and r["op"] == "conv2d")
    assert conv_in | {"name": None, "inputs": None} == {
        "name": None, "kind": "call_function", "op": "conv2d", "source": "aten.conv2d.default",
        "shape": [2, 32, 16, 16], "dtype": "float32", "module": "conv_in", "domain": "spatial",
        "level": 0, "invariant": None, "attention": None, "macs": 2 * 32 * 16 * 16 * 4 * 9,
        "unknown": False, "inputs": None}
    assert row(canonical_report, "encoder_hidden_states")["invariant"] == "prompt"


def test_summary(canonical, canonical_report):
    summary = canonical_report["summary"]
    assert summary["nodes"] == len(canonical.graph.nodes)
    assert summary["ops"]["conv2d"] == 33 and summary["ops"]["attention"] == 8
    assert summary["attention"] == {"self": 4, "cross": 4}
    assert summary["unknown_ops"] == {}
    assert {k: v["size"] for k, v in summary["levels"].items()} == {"0": [16, 16], "1": [8, 8]}
    calls = [n for n in canonical.graph.nodes if n.op == "call_function"]
    assert summary["macs"] == sum(n.meta[ir.META_MACS] for n in calls) > 0
    assert sum(d["nodes"] for d in summary["domains"].values()) == len(calls)
    assert sum(d["macs"] for d in summary["domains"].values()) == summary["macs"]
    positional = summary["domains"]["spatial"]["nodes"] + summary["domains"]["tokens"]["nodes"]
    assert sum(level["nodes"] for level in summary["levels"].values()) == positional
    assert canonical_report["inputs"] == {
        "sample": {"shape": [2, 4, 16, 16], "dtype": "float32"},
        "timestep": {"shape": [2], "dtype": "float32"},
        "encoder_hidden_states": {"shape": [2, 77, 32], "dtype": "float32"}}


def test_captured_stage_has_no_analysis(captured_report):
    summary = captured_report["summary"]
    assert summary["ops"]["aten.conv2d.default"] == 33
    assert summary["levels"] == {} and summary["domains"] == {}
    assert summary["macs"] is None and summary["attention"] is None
    calls = [r for r in captured_report["nodes"] if r["kind"] == "call_function"]
    assert all(r["domain"] is None and r["macs"] is None and r["source"] is None for r in calls)
    assert any(r["module"].startswith("down_blocks.0.") for r in calls)


@pytest.mark.parametrize("which", ["canonical_report", "captured_report", "unknown_report"])
def test_json_matches_schema(request, which):
    report = request.getfixturevalue(which)
    text = inspect.render(report, "json")
    assert json.loads(text) == report
    validate(json.loads(text), inspect.JSON_SCHEMA)


def test_validator_catches_violations(canonical_report):
    broken = json.loads(inspect.render(canonical_report, "json"))
    broken["nodes"][0]["level"] = "0"
    with pytest.raises(AssertionError, match=r"\$.nodes\[0\].level"):
        validate(broken, inspect.JSON_SCHEMA)
    del broken["summary"]
    with pytest.raises(AssertionError, match="missing {'summary'}"):
        validate(broken, inspect.JSON_SCHEMA)


def test_schema_with_jsonschema_if_installed(canonical_report):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(inspect.JSON_SCHEMA)
    jsonschema.validate(json.loads(inspect.render(canonical_report, "json")), inspect.JSON_SCHEMA)


def test_unknown_op_reported(unknown_report):
    assert unknown_report["summary"]["unknown_ops"] == {"aten.cumsum.default": 1}
    cumsum = row(unknown_report, "cumsum")
    assert cumsum["unknown"] and cumsum["op"] == "aten.cumsum.default"
    # Unknown, but [B, C, H, W] at the sample's size: the safety rule places it by its shape.
    assert cumsum["domain"] == "spatial"
    text = inspect.render(unknown_report, "text")
    assert "unknown ops: aten.cumsum.default x1" in text
    assert "aten.cumsum.default (UNKNOWN)" in text


# ------------------------------------------------------------------ text

def test_text(canonical_report):
    text = inspect.render(canonical_report, "text")
    lines = text.splitlines()
    assert lines[0] == "model sd15-tiny  stage canonical  frontend export"
    assert "levels: L0 16x16, L1 8x8" in lines and "attention: 4 self, 4 cross" in lines
    header = next(line for line in lines if line.startswith("name "))
    assert header.split() == ["name", "op", "shape", "dtype", "domain", "MACs", "module"]
    conv_in = next(line for line in lines if line.endswith(" conv_in"))
    assert conv_in.split()[1:5] == ["conv2d", "2x32x16x16", "float32", "spatial@L0"]
    assert "By op" in lines and "By level" in lines
    assert not any(line.startswith("c0_") for line in lines)  # parameters are not listed


def test_text_captured(captured_report):
    lines = inspect.render(captured_report, "text").splitlines()
    assert any(line.split()[1:2] == ["aten.conv2d.default"] for line in lines)
    assert "By op" in lines and "By level" not in lines
    assert not any(line.startswith(("levels:", "MACs:", "unknown ops:")) for line in lines)


def test_unknown_format(canonical_report):
    with pytest.raises(FiseditError, match="unknown format 'png'.*text, json, dot, svg"):
        inspect.render(canonical_report, "png")


# ------------------------------------------------------------------ DOT and SVG

def parse_dot(text):
    """The pydot graph and its nodes by name, from the top level and every cluster."""
    with warnings.catch_warnings():  # pydot's parser uses pyparsing's deprecated names
        warnings.simplefilter("ignore", DeprecationWarning)
        (graph,) = pydot.graph_from_dot_data(text)
    found = list(graph.get_nodes())
    for cluster in graph.get_subgraphs():
        found += cluster.get_nodes()
    return graph, {n.get_name().strip('"'): n for n in found
                   if n.get_name() not in ("node", "edge", "graph")}


def test_dot(canonical_report):
    graph, dot_nodes = parse_dot(inspect.render(canonical_report, "dot"))
    shown = [r for r in canonical_report["nodes"] if r["kind"] != "get_attr"]
    assert set(dot_nodes) == {r["name"] for r in shown}
    assert len(graph.get_edges()) == sum(
        source in dot_nodes for r in shown for source in r["inputs"])
    clusters = {c.get_name().strip('"') for c in graph.get_subgraphs()}
    assert {"cluster_down_blocks.0", "cluster_mid_block", "cluster_up_blocks.1",
            "cluster_time_embedding", "cluster_conv_in"} <= clusters
    conv_in = next(r for r in shown if r["module"] == "conv_in")
    fill = dot_nodes[conv_in["name"]].get("fillcolor").strip('"')
    down = next(r for r in shown if r["op"] == "conv2d" and r["level"] == 1)
    attn = next(r for r in shown if r["op"] == "attention")
    fills = {dot_nodes[r["name"]].get("fillcolor").strip('"') for r in (conv_in, down, attn)}
    assert len(fills) == 3 and fill == inspect._SPATIAL_COLORS[0]  # by domain and level


def test_dot_flags_unknown_ops_red(unknown_report):
    _, dot_nodes = parse_dot(inspect.render(unknown_report, "dot"))
    cumsum = dot_nodes["cumsum"]
    assert cumsum.get("color").strip('"') == "red"
    assert cumsum.get("fillcolor").strip('"') == inspect._UNKNOWN_COLOR


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_svg(unknown_report):
    svg = inspect.render(unknown_report, "svg")
    assert "<svg" in svg and "cumsum" in svg


def test_svg_without_graphviz(monkeypatch, unknown_report):
    monkeypatch.setattr(inspect.shutil, "which", lambda name: None)
    with pytest.raises(FiseditError, match="apt-get install graphviz"):
        inspect.render(unknown_report, "svg")
    with pytest.raises(FiseditError, match="apt-get install graphviz"):
        inspect.dump("sd15-tiny", fmt="svg")  # refused before the (slow) capture


# ------------------------------------------------------------------ networkx

def test_networkx(canonical):
    graph = inspect.to_networkx(canonical)
    assert graph.number_of_nodes() == len(canonical.graph.nodes)
    assert graph.number_of_edges() == sum(len(n.all_input_nodes) for n in canonical.graph.nodes)
    assert nx.is_directed_acyclic_graph(graph)
    conv = next(n for n in canonical.graph.nodes if ir.is_op(n, "conv2d"))
    attrs = graph.nodes[conv.name]
    assert {"op", "shape", "domain", "level", "macs", "module"} <= set(attrs)
    assert (attrs["op"], attrs["domain"], attrs["level"]) == ("conv2d", "spatial", 0)
    assert attrs["macs"] == conv.meta[ir.META_MACS] and attrs["module"] == "conv_in"


# ------------------------------------------------------------------ dump argument checks

@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"model": "sd15-tiny", "pipeline": "x"}, "exactly one"),
    ({"model": "sd15-tiny", "fmt": "yaml"}, "unknown format"),
    ({"model": "sd15-tiny", "batch": 0}, "batch 0 is out of range"),
])
def test_dump_rejects_bad_arguments(kwargs, message):
    with pytest.raises(FiseditError, match=message):
        inspect.dump(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"frontend": "bogus"}, "frontend must be one of 'export', 'dynamo', got 'bogus'"),
    ({"frontend": None}, "frontend must be one of"),
    ({"stage": "bogus"}, "unknown stage 'bogus'"),
    ({"fmt": "yaml"}, "unknown format"),
    ({"batch": True}, "batch must be an int"),
    ({"batch": 10**6}, "batch 1000000 is out of range"),
])
def test_dump_refuses_a_bad_choice_before_building_the_unet(monkeypatch, kwargs, message):
    def build(*args, **kwargs):
        raise AssertionError("the U-Net was built before the arguments were checked")

    monkeypatch.setattr(inspect.zoo, "unet", build)
    with pytest.raises(FiseditError, match=message):
        inspect.dump("sd15-tiny", **kwargs)


def test_sparse_stage_marks_how_an_edit_runs_each_node():
    unet = zoo.unet("sd15-tiny")
    mask = mask_from_box("0.0,0.0,0.25,0.25", (16, 16))
    assert int(mask.sum()) == 16
    report = inspect.sparse_report(unet, zoo.example_inputs(unet), mask, model="sd15-tiny",
                                   frontend="export")
    validate(json.loads(inspect.render(report, "json")), inspect.JSON_SCHEMA)
    sparse = report["summary"]["sparse"]
    assert sparse["ideal_macs"] <= sparse["sparse_macs"] < sparse["dense_macs"]
    modes = {row["sparse"] for row in report["nodes"] if row["kind"] == "call_function"}
    assert modes == {"sparse", "global"}
    convs = [row for row in report["nodes"] if row["op"] == "conv2d"]
    assert all(row["sparse_macs"] < row["macs"] for row in convs)
    assert any(row["cache_write"] for row in report["nodes"])
    assert "sparse MACs" in inspect.render(report, "text")


def test_sparse_stage_labels_the_rows_of_a_dense_plan_dense():
    """A mask large enough for every level to run dense: the rows say so, as the levels do."""
    unet = zoo.unet("sd15-tiny")
    mask = mask_from_box("0.0,0.0,0.7,0.7", (16, 16))
    report = inspect.sparse_report(unet, zoo.example_inputs(unet), mask, model="sd15-tiny",
                                   frontend="export")
    assert all(level["dense"] for level in report["summary"]["sparse"]["levels"])
    modes = {row["sparse"] for row in report["nodes"] if row["kind"] == "call_function"}
    assert modes == {"dense", "global"}


@pytest.mark.parametrize("kwargs, message", [
    ({"stage": "sparse"}, "needs exactly one of --mask"),
    ({"mask_box": "0,0,0.5,0.5"}, "needs exactly one of --mask"),
    ({"stage": "sparse", "mask_box": "0.5,0,0.2,1"}, "x0 < x1"),
    ({"stage": "sparse", "mask": "missing.png"}, "cannot read the mask missing.png"),
    ({"stage": "sparse", "mask": "m.png", "mask_box": "0,0,1,1"}, "either --mask or --mask-box"),
])
def test_sparse_stage_argument_errors(kwargs, message):
    with pytest.raises(FiseditError, match=message):
        inspect.dump("sd15-tiny", **kwargs)


# ------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("kwargs, message", [
    ({"mask_box": (0, 0, 0.5, 0.5)}, r"mask_box must be a str \"x0,y0,x1,y1\".*got tuple"),
    ({"mask_box": [0, 0, 8, 8]}, "mask_box must be a str"),
    ({"mask_box": "0,0,0.5"}, "must be x0,y0,x1,y1 as fractions"),
    ({"mask_box": "0,0,0.5,0.5,1"}, "must be x0,y0,x1,y1 as fractions"),
    ({"mask_box": "a,0,0.5,0.5"}, "must be x0,y0,x1,y1 as fractions"),
    ({"mask_box": "0,0,8,8"}, "0 <= x0 < x1 <= 1"),
    ({"mask_box": "nan,0,0.5,0.5"}, "0 <= x0 < x1 <= 1"),
    ({"mask": torch.ones(16, 16, dtype=torch.bool)},
     "mask must be the path of a PNG.*got Tensor.*sparse_report"),
])
def test_dump_refuses_a_bad_mask_before_building_the_unet(monkeypatch, kwargs, message):
    def build(*args, **kwargs):
        raise AssertionError("the U-Net was built before the mask was checked")

    monkeypatch.setattr(inspect.zoo, "unet", build)
    with pytest.raises(FiseditError, match=message):
        inspect.dump("sd15-tiny", stage="sparse", **kwargs)


def test_dump_refuses_objects_for_model_and_pipeline():
    with pytest.raises(FiseditError, match="model must be a zoo model name.*got WithUnknownOp.*"
                                           "capture it first"):
        inspect.dump(WithUnknownOp())
    with pytest.raises(FiseditError, match="pipeline must be the folder.*got dict.*pipe.unet"):
        inspect.dump(pipeline={"unet": None})
    with pytest.raises(FiseditError, match="pipeline must be the folder.*got int"):
        inspect.pipeline_unet(3)


@pytest.mark.parametrize("function", [inspect.to_networkx, inspect.node_rows])
def test_graph_functions_refuse_a_module(function):
    """A U-Net module, not its graph: the message says how to capture one."""
    with pytest.raises(FiseditError, match=r"torch.fx.GraphModule\), got WithUnknownOp; a module "
                                           r"is not a graph; capture it first: .*trace\(unet"):
        function(WithUnknownOp())
    with pytest.raises(FiseditError, match="got str; to inspect a U-Net, capture it first"):
        function("sd15-tiny")


@pytest.mark.parametrize("kwargs, message", [
    ({"stage": "bogus"}, "stage must be one of 'captured', 'canonical', 'sparse', got 'bogus'"),
    ({"frontend": "bogus"}, "frontend must be one of 'export', 'dynamo', got 'bogus'"),
    ({"model": None}, "model must be a str naming the model.*got NoneType"),
])
def test_report_refuses_bad_labels(canonical, kwargs, message):
    labels = {"model": "sd15-tiny", "stage": "canonical", "frontend": "export"} | kwargs
    with pytest.raises(FiseditError, match=message):
        inspect.report(canonical, **labels)
    with pytest.raises(FiseditError, match="capture it first"):
        inspect.report(WithUnknownOp(), model="m", stage="canonical", frontend="export")


@pytest.mark.parametrize("value, message", [
    ({}, "the report lacks 'model', 'stage', 'frontend', 'inputs', 'summary', 'nodes'"),
    ([], "render takes the dict that inspect.report\\(\\) returns, got list"),
    (None, "got NoneType"),
])
def test_render_refuses_what_is_not_a_report(value, message):
    with pytest.raises(FiseditError, match=message):
        inspect.render(value, "text")


def test_render_refuses_a_graph(canonical):
    with pytest.raises(FiseditError, match=r"not a graph: call inspect.report\(gm"):
        inspect.render(canonical, "json")


def test_summarize_checks_its_rows_and_level_sizes(canonical, canonical_report):
    rows = canonical_report["nodes"]
    with pytest.raises(FiseditError, match="levels up to 1 but level_sizes gives 0 sizes; pass "
                                           "the graph's gm.meta\\['fc_levels'\\]"):
        inspect.summarize(rows)     # the sizes left out: was a KeyError '0'
    with pytest.raises(FiseditError, match="level_sizes must be a list of \\(H, W\\) pairs"):
        inspect.summarize(rows, [16, 8])
    with pytest.raises(FiseditError, match="summarize takes the list of row dicts.*got dict"):
        inspect.summarize(canonical_report)
    assert inspect.summarize(rows, canonical.meta["fc_levels"]) == canonical_report["summary"]


@pytest.fixture
def no_compile(monkeypatch):
    """SparseEngine.program (the capture and compile) made to fail: checks must come first."""
    from fisedit_compiler.engine.engine import SparseEngine

    def program(self, inputs):
        raise AssertionError("compiled before the arguments were checked")

    monkeypatch.setattr(SparseEngine, "program", program)


def test_sparse_report_refuses_bad_arguments_before_compiling(no_compile):
    from fisedit_compiler.config import SparseConfig

    unet = zoo.unet("sd15-tiny")
    inputs, mask = zoo.example_inputs(unet), mask_from_box("0,0,0.5,0.5", (16, 16))
    with pytest.raises(FiseditError, match="frontend 'export' differs from config.frontend "
                                           "'dynamo'"):   # was silently ignored but for the label
        inspect.sparse_report(unet, inputs, mask, model="m", frontend="export",
                              config=SparseConfig(frontend="dynamo"))
    with pytest.raises(FiseditError, match="frontend must be one of"):
        inspect.sparse_report(unet, inputs, mask, model="m", frontend="bogus")
    with pytest.raises(FiseditError, match="model must be a str"):
        inspect.sparse_report(unet, inputs, mask, model=unet, frontend="export")
    with pytest.raises(FiseditError, match="sparse_report's inputs must be a dict .* got list"):
        inspect.sparse_report(unet, [inputs], mask, model="m", frontend="export")
    with pytest.raises(FiseditError, match="the edit mask must have dtype bool"):
        inspect.sparse_report(unet, inputs, mask.float(), model="m", frontend="export")
    with pytest.raises(FiseditError, match=r"shape \(12, 12\) but the latent is 16x16"):
        inspect.sparse_report(unet, inputs, torch.zeros(12, 12, dtype=torch.bool), model="m",
                              frontend="export")
