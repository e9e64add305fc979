"""The benchmark: the kernel categories of the profile and the tuned baseline (CPU); what the
profile measures (GPU)."""

import json

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, cli, zoo


@pytest.mark.parametrize("name, category", [
    ("_sparse_conv2d_kernel", "sparse conv"),
    ("_gather_taps_kernel", "sparse conv"),
    ("_epilogue_kernel", "sparse conv"),
    ("_attention_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("_group_norm_kernel", "group norm"),
    ("_add_layer_norm_kernel", "add + layer norm, GEGLU"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>",
     "add + layer norm, GEGLU"),
    ("nvjet_sm90_hsh_16x64_64x16_4x2_h_bz_bias_TNN", "GEMM (cuBLAS)"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::Half>>",
     "other elementwise"),
    ("void at::native::index_elementwise_kernel<128, 4>", "copy, gather, scatter"),
    ("Memcpy DtoD (Device -> Device)", "copy, gather, scatter"),
    ("some_new_kernel", "other"),
])
def test_every_kernel_falls_in_one_category(name, category):
    assert bench.kernel_category(name) == category


def test_the_tuned_baseline_is_a_channels_last_copy_with_fused_projections():
    unet = zoo.unet("sd15-tiny")
    tuned = bench.tuned_unet(unet)
    assert tuned is not unet
    conv = tuned.conv_in.weight
    assert conv.is_contiguous(memory_format=bench.torch.channels_last)
    attention = tuned.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert getattr(attention, "fused_projections", False)
    assert not getattr(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1,
                       "fused_projections", False)


def test_the_table_shows_the_ratio_to_the_dense_step_timed_beside_each_row():
    row = {"layout": "scattered", "area": 0.2, "mask_fraction": 0.138, "triton_ms": 7.36,
           "torch_graphs_ms": 7.2,
           "speedup_vs_eager": 3.86, "speedup_vs_compiled": 0.96, "sparse_gmacs": 803.3,
           "ideal_gmacs": 166.3, "triton_error": 2e-3, "ok": True, "levels": ["dense"] * 4}
    result = {"model": "sd15", "resolution_px": 512, "batch": 2, "dtype": "float16",
              "environment": {"device": "GPU", "torch": "2", "triton": "3", "commit": "abc"},
              "dense": {"eager_ms": 28.4, "best_compiled_mode": "tuned:reduce-overhead",
                        "best_compiled_ms": 7.05},
              "cache_mib_per_step": 247.4,
              "rows": [row, {**row, "dense_beside_ms": 7.5, "speedup_vs_compiled_beside": 1.02,
                             "triton_loop_ms": 7.0, "dense_beside_loop_ms": 7.7,
                             "speedup_loop_beside": 1.1}]}
    lines = bench.table(result).splitlines()
    header = [cell.strip() for cell in lines[2].strip("|").split("|")]
    without, beside = ([cell.strip() for cell in line.strip("|").split("|")]
                       for line in lines[4:6])
    column = header.index("vs compiled beside")
    loop = header.index("in a loop: engine vs compiled beside")
    assert len(header) == len(without) == len(beside)
    assert without[column] == without[loop] == "-"
    assert beside[column] == "1.02x (7.50 ms)" and beside[loop] == "7.00 vs 7.70 ms (1.10x)"
    assert "dense beside 7.50 (1.02x); loop 7.00 vs 7.70 (1.10x)" in bench._format_row(
        result["rows"][1])
    # The area asked for, and what the scattered mask marks where that differs.
    assert without[header.index("area")] == "20% (13.8% marked)"
    assert bench._area_label({"area": 0.002, "mask_fraction": 0.002}) == "0.2%"
    assert bench._area_label({"area": 0.05, "mask_fraction": 0.0488}) == "5%"
    # An area below one latent pixel of 64x64 marks one: said, not hidden.
    assert bench._area_label({"area": 1e-4, "mask_fraction": 1 / 4096}) == \
        "0.01% (0.0244% marked)"


def test_outputs_agree_after_a_later_model_fails(tmp_path, monkeypatch):
    """results.json, results.md and speedup.png are written together after each model: a
    failure of the next leaves them in agreement, an earlier run's files replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("an earlier run's table\n")
    (out / "speedup.png").write_bytes(b"an earlier run's plot")

    def run(model, **settings):
        if model == "sdxl-tiny":
            raise RuntimeError("out of memory")
        return {"model": model, "rows": []}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "table", lambda result: f"table of {result['model']}")
    monkeypatch.setattr(bench, "plot", lambda results, path: False)    # no matplotlib
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["bench", "--model", "sd15-tiny", "--model", "sdxl-tiny", "--out", str(out)])
    assert [r["model"] for r in json.loads((out / "results.json").read_text())] == ["sd15-tiny"]
    assert (out / "results.md").read_text() == "table of sd15-tiny\n"
    assert not (out / "speedup.png").exists()


def test_an_edit_is_timed_as_the_successive_steps_of_a_pass():
    """Each timed call edits the next recorded step (so only a pass's first step pays the
    full U-Net state check, as in a real edit), and one timing stays inside one pass."""
    class Engine:
        def __init__(self):
            self.steps = []

        def edit(self, cache, step, plan, **inputs):
            self.steps.append(step)

    class Cache:
        num_steps = bench.recorded_steps(reps=5)

    engine = Engine()
    edit = bench.edit_pass(engine, Cache(), plan=object(), edited={})
    for _ in range(1 + 3 + 5):           # the error check, cuda_time_ms' warm-up and reps
        edit()
    assert engine.steps == list(range(9)) and Cache.num_steps >= 9
    for _ in range(Cache.num_steps - 9 + 1):
        edit()
    assert engine.steps[-1] == 0, "after the last recorded step, a new pass"


# Bad options are refused with exit code 2 before any model work or the CUDA check, and a
# failed run leaves no output folder.

@pytest.fixture
def no_benchmark(monkeypatch):
    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran before its options were checked")

    monkeypatch.setattr(bench, "_setup", ran)


@pytest.mark.parametrize("extra, message", [
    (["--areas", "0.1,abc"], "--areas takes comma-separated fractions of the latent such as "
                             "0.01,0.1,1.0; 'abc' is not a number"),
    (["--areas", "0.1,,0.2"], "'' is not a number"),
    (["--areas", "0"], "--areas 0 is out of range: an edit area is a fraction of the latent "
                       "in (0, 1]"),
    (["--areas", "1.5"], "--areas 1.5 is out of range"),
    (["--areas", "nan"], "--areas nan is out of range"),
    (["--layouts", "blob,scatered"], "--layouts must be one of 'blob', 'scattered', got "
                                     "'scatered'"),
    (["--compile-modes", "reduce-overhead,max-autotune"], "--compile-modes must be one of "
                                                          "'default'"),
    (["--compile-modes", "tuned:fast"], "got 'tuned:fast'"),
    (["--reps", "0"], "--reps 0 is out of range"),
    (["--tile", "4,0"], "--tile takes comma-separated tile sides per level, finest first, such "
                        "as 4,2,1; '0' is not a whole number >= 1"),
    (["--tile", "4,2.5"], "'2.5' is not a whole number"),
    (["--tile", "+2"], "'+2' is not a whole number"),
    (["--areas", "0.1,0.2", "--profile-area", "0.05"], "--profile-area 0.05 profiles the blob "
                                                       "edit of that area, and this run has none"),
    (["--layouts", "scattered", "--profile-area", "0.1"], "add it to --areas and blob to "
                                                          "--layouts"),
    (["--layouts", "scattered", "--areas", "1.0"], "--layouts scattered with --areas 1.0 "
                                                   "measures nothing"),
    # The same measurement twice, into two rows of one table.
    (["--areas", "0.05,0.1,0.05"], "--areas names 0.05 more than once; give each value once"),
    (["--layouts", "blob,blob"], "--layouts names blob more than once"),
    (["--model", "sd15-tiny"], "--model names sd15-tiny more than once"),
])
def test_bad_options_are_refused_before_any_work(extra, message, tmp_path, capsys,
                                                 no_benchmark):
    out = tmp_path / "bench-out"
    assert cli.main(["bench", "--model", "sd15-tiny", "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert "fisedit-compiler bench: error: --" in err and message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_the_lever_options_reach_the_engine_config(tmp_path, monkeypatch):
    """Each A/B option of the bench turns its SparseConfig lever off, and only that one."""
    seen = []

    def run(model, **settings):
        seen.append(settings["config"])
        raise SystemExit(0)

    monkeypatch.setattr(bench, "run", run)
    for extra in ([], ["--no-hoist-pass-constants"], ["--no-group-projections"],
                  ["--tile", "2,1"], ["--no-fold-text-queries"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--model", "sd15-tiny", "--out", str(tmp_path / "out")] + extra)
    default, per_step, separate, small_tiles, unfolded = seen
    assert default == bench.SparseConfig()
    assert per_step == bench.SparseConfig(hoist_pass_constants=False)
    assert separate == bench.SparseConfig(group_projections=False)
    assert small_tiles == bench.SparseConfig(tile=(2, 1))
    assert unfolded == bench.SparseConfig(fold_text_queries=False)


def test_an_out_path_that_is_a_file_is_refused(tmp_path, capsys, no_benchmark):
    (tmp_path / "file").write_text("")
    assert cli.main(["bench", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(bench.torch.cuda.is_available(), reason="checks the run without CUDA")
def test_a_run_failing_without_cuda_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "bench-out"
    assert cli.main(["bench", "--model", "sd15-tiny", "--areas", "0.1", "--layouts", "blob",
                     "--compile-modes", "", "--out", str(out)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("area, tiles", [(0.01, 9), (0.05, 25)])
def test_the_bench_square_sits_off_the_tile_grid_as_most_placements_do(area, tiles):
    """With the engine's tiles and dilation, a centred square of 1% or 5% of SD1.5's 64x64
    latent lies on level 0's tile grid (4 and 16 tiles), the best case; the bench's square
    covers what the same square at most places does (benchmarks/bucket_fit.py --placements)."""
    from fisedit_compiler.config import SparseConfig
    from fisedit_compiler.execution import plan as plans

    config = SparseConfig()
    levels = [(64, 64), (32, 32), (16, 16), (8, 8)]

    def level0_tiles(mask):
        return plans.tile_counts(mask, levels, config.tiles_for(levels), config.dilation)[0]

    placed = bench.placed_blob((64, 64), area)
    assert placed.sum() == plans.blob_mask((64, 64), area).sum()
    assert level0_tiles(placed) == tiles > level0_tiles(plans.blob_mask((64, 64), area))


@pytest.mark.gpu
def test_the_profile_is_of_steps_inside_a_pass_not_of_a_pass_start():
    """A pass's first step reads every weight's norm (a fused multi-tensor kernel, one copy
    per group) and loads the pass constants: the profiled steps are a pass's later ones."""
    import torch

    unet = zoo.unet("sd15-tiny", dtype=torch.float16, device="cuda")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    mask = bench.blob_mask((16, 16), 0.1).cuda()
    plan = engine.plan(mask)
    profile = bench.profile_step(engine, inputs, plan, bench.edited_inputs(inputs, mask),
                                 calls=2)
    assert profile["kernels_per_step"] > 0
    names = [row["kernel"] for row in profile["top"]]
    assert not any("multi_tensor_apply" in name for name in names), names
    for row in profile["top"]:
        assert 0 < row["us_min"] <= row["us_median"] <= row["us_max"], row
        per_step_us = 1000 * row["ms_per_step"]
        assert row["us_min"] * row["calls_per_step"] <= per_step_us * (1 + 1e-6), row


def test_the_torch_path_engines_keep_a_conv_method_they_cannot_use_out(tmp_path):
    """A bench of ``--conv-method implicit`` compares the Triton engine against the torch
    path; the torch path's configs take the default conv method (it has no choice)."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=1, seed=0)
    config = fc.SparseConfig(conv_method="implicit", cuda_graphs=False)
    engines, _, _ = bench.build_engines(unet, inputs, config, calibrate=False, reference=True)
    assert engines["triton"].config.conv_method == "implicit"
    assert {engines[name].config.kernels for name in ("torch_graphs", "reference")} == {"torch"}


@pytest.mark.parametrize("model", ["sd15-tiny", "ddpm-tiny"])
def test_edited_inputs_change_the_latents_inside_the_mask_and_the_text_where_there_is_one(model):
    """An unconditional U-Net's inputs have no text states: only the latents are edited."""
    unet = zoo.unet(model)
    inputs = zoo.example_inputs(unet, batch=2)
    mask = torch.zeros(inputs["sample"].shape[-2:], dtype=torch.bool)
    mask[2:5, 3:6] = True
    edited = bench.edited_inputs(inputs, mask)
    assert set(edited) == set(inputs)
    changed = edited["sample"] != inputs["sample"]
    assert changed[..., mask].all() and not changed[..., ~mask].any()
    text = inputs.get("encoder_hidden_states")
    assert text is None or not torch.equal(edited["encoder_hidden_states"], text)
