#!/usr/bin/env bash
# The GPU measurements of the open issues, one stage per device call (each fits 10 minutes):
#   bash benchmarks/gpu_run.sh tests      GPU tests of the kernels, the engine and the cache
#   bash benchmarks/gpu_run.sh sd15       bench sd15: default thresholds, a 5% profile
#   bash benchmarks/gpu_run.sh sdxl       bench sdxl at 1024 px (and sd21 at 768 px)
#   bash benchmarks/gpu_run.sh e2e        end-to-end edits with new masks, as users call them,
#                                         vs dense regeneration (sd15; reduce-overhead only:
#                                         max-autotune compiles past the 10-minute limit)
#   bash benchmarks/gpu_run.sh e2e-ab     the e2e run (4 new masks a group, 2 repeats) for this tree, then
#                                         for an earlier one in .device/base (see ab below), on one machine
#   bash benchmarks/gpu_run.sh e2e-sdxl   the same for sdxl at 1024 px (cache partly on the host)
#   bash benchmarks/gpu_run.sh shapes     train the shapes model (~8 min), weights under $OUT
#   bash benchmarks/gpu_run.sh masks      edit time per mask estimator (sd15, 5% mask, issue 15)
#   bash benchmarks/gpu_run.sh sd15-ab    sd15 steps with and without grouped projections, and
#                                         the token-path microbenchmark (issue 17's levers)
#   bash benchmarks/gpu_run.sh conv-ab    the conv methods (implicit GEMM, gather + cuBLAS) in
#                                         isolation and in sd15 steps, and grouped projections off
#   bash benchmarks/gpu_run.sh dense      the engine's dense path against the tuned dense module
#                                         (benchmarks/dense_paths.py), then the GPU tests of the
#                                         CUDA graphs, the engine and the conv kernel
#   bash benchmarks/gpu_run.sh calibrated sd15 with calibrated thresholds (never slower than
#                                         dense?) against the tuned dense step
#   bash benchmarks/gpu_run.sh launch     sd15 steps with programmatic dependent launch off and
#                                         on (benchmarks/launch_overlap.py), then the kernels GPU tests
#   bash benchmarks/gpu_run.sh gemms      the 5% sd15 step's GEMMs under cuBLAS, cuBLASLt and
#                                         per-shape autotuning (benchmarks/micro_step_gemms.py)
#   bash benchmarks/gpu_run.sh tile-ab    sd15 steps with tiles (4, 2, 1), (2, 1) and (1,): how
#                                         much a smaller active area (the ring of tiles around a
#                                         mask) buys against more table entries (issue 17)
#   bash benchmarks/gpu_run.sh fold-ab    sdxl 5% steps with and without the cross-attention
#                                         query fold (passes.fold_text_queries, issue 17; forced
#                                         past its size rule), alternated and profiled, then the
#                                         text-attention kernel's GPU tests
#   bash benchmarks/gpu_run.sh split-ab   sd15 steps with the self-attention's key split aiming at
#                                         2, 4 and 8 programs per SM (kernels.attention
#                                         PROGRAMS_PER_SM), twice each, 5% profiles (issue 17)
#   bash benchmarks/gpu_run.sh ab         steps of this tree against an earlier one, alternated on one
#                                         machine: put the earlier tree's package in .device/base
#                                         (git archive <commit> fisedit_compiler | tar -x -C
#                                         .device/base); MODEL (sd15) and AREAS (0.01,0.05,0.2)
#                                         choose the bench, 5% profiles of both
# On the device machine diffusers comes from the wheel in .device/wheels (carry ".device").
# Output goes to $OUT (default ./gpu-out) and is streamed, so a cut-off run still returns it.
set -o pipefail
case "$1" in tests|sd15|sdxl|e2e|e2e-ab|e2e-sdxl|shapes|masks|sd15-ab|conv-ab|hoist-ab|dense|calibrated|launch|gemms|tile-ab|fold-ab|split-ab|ab) ;; *) echo "usage: $0 tests|sd15|sdxl|e2e|e2e-ab|e2e-sdxl|shapes|masks|sd15-ab|conv-ab|hoist-ab|dense|calibrated|launch|gemms|tile-ab|fold-ab|split-ab|ab" >&2; exit 2 ;; esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
bench() { python3 -m fisedit_compiler.cli bench --reps 10 "$@" 2>&1 | grep -v -i "warn" | tee -a "$OUT/bench.log"; }
# bench with one module constant set first: bench_with MODULE NAME VALUE ARGS...
bench_with() {
  python3 -c "import sys, importlib; setattr(importlib.import_module('$1'), '$2', $3); from fisedit_compiler.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --reps 10 "${@:4}" 2>&1 | grep -v -i "warn" | tee -a "$OUT/bench.log"
}
case "$1" in
  tests)  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/tests.log" ;;
  sd15)   bench --model sd15 --areas 0.01,0.05,0.2 --no-reference --no-calibrate --profile-area 0.05 --out "$OUT/sd15" ;;
  sdxl)   bench --model sdxl --areas 0.01,0.05,0.2 --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes tuned:reduce-overhead --profile-area 0.05 --out "$OUT/sdxl"
          bench --model sd21 --areas 0.01,0.05,0.2 --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes tuned:reduce-overhead --out "$OUT/sd21" ;;
  sd15-ab) python3 benchmarks/micro_token_gemms.py --area 0.0625 --json "$OUT/micro_token_gemms.json"
          bench --model sd15 --areas 0.01,0.05,0.2 --no-reference --no-calibrate --no-prepare --out "$OUT/grouped"
          bench --model sd15 --areas 0.01,0.05,0.2 --no-reference --no-calibrate --no-prepare --compile-modes "" --no-group-projections --out "$OUT/separate" ;;
  conv-ab) python3 benchmarks/micro_sparse_conv.py --layouts channel-fast --methods implicit,gather \
            --fractions 0.01,0.05,0.2 --variants fused --json "$OUT/micro_conv_methods.json" 2>&1 \
            | tee "$OUT/micro_conv.log" | tail -42
          ab="--model sd15 --areas 0.01,0.05,0.2 --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes="
          bench $ab --profile-area 0.05 --out "$OUT/implicit"
          bench $ab --profile-area 0.05 --conv-method gather --out "$OUT/gather"
          bench $ab --no-group-projections --out "$OUT/separate" ;;
  hoist-ab) for model in sd15 sdxl; do
            ab="--model $model --areas 0.05 --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes="
            bench $ab --out "$OUT/hoisted_$model"
            bench $ab --no-hoist-pass-constants --out "$OUT/per_step_$model"
          done ;;
  dense)  python3 benchmarks/dense_paths.py --model sd15 --json "$OUT/dense_paths.json" 2>&1 \
            | grep -v -i warn | tee "$OUT/dense_paths.log" | tail -9
          python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py \
            tests/test_triton_engine.py tests/test_kernels_sparse_conv.py 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
  calibrated) bench --model sd15 --areas 0.01,0.05,0.2,0.5 --no-reference --no-prepare \
            --compile-modes tuned:reduce-overhead --out "$OUT/calibrated" ;;
  launch) python3 benchmarks/launch_overlap.py --model sd15 --json "$OUT/launch_overlap.json" 2>&1 \
            | grep -v -i warn | tee "$OUT/launch_overlap.log"
          python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/extra/*.whl
          timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_*.py 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
  gemms)  python3 benchmarks/micro_step_gemms.py --model sd15 --area 0.05 --autotune-seconds 150 \
            --json "$OUT/micro_step_gemms.json" 2>&1 | grep -v -e AUTOTUNE -e "^  " -e SingleProcess \
            | tee "$OUT/micro_step_gemms.log" | tail -60 ;;
  tile-ab) ab="--model sd15 --areas 0.01,0.05,0.2 --no-reference --no-calibrate --no-prepare --compile-modes="
          for tile in 4,2,1 2,1 1; do bench $ab --tile $tile --out "$OUT/tile_${tile//,/}"; done ;;
  fold-ab) # SDXL's cross-attentions fail the pass's size rule; fold them anyway, alternated
          # with unfolded runs on one warm machine, with the 5% profiles (issue 17; SD1.5's
          # A/B is `bench --no-fold-text-queries` against the default).
          ab="--model sdxl --areas 0.05 --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes= --profile-area 0.05"
          for run in 1 2; do
            bench $ab --no-fold-text-queries --out "$OUT/unfolded_sdxl_$run"
            bench_with fisedit_compiler.passes.fold_text_queries MAX_EXTRA_KEY_BYTES "1 << 40" $ab --out "$OUT/folded_sdxl_$run"
          done
          python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/extra/*.whl
          python3 -m pytest -q -p no:cacheprovider tests/test_kernels_text_attention.py 2>&1 | tee "$OUT/tests.log" | tail -5 ;;
  split-ab) ab="--model sd15 --areas ${AREAS:-0.01,0.05,0.2} --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes="
          for run in 1 2; do
            for per_sm in 2 4 8; do
              profile=$([ $run = 1 ] && echo "--profile-area 0.05")
              echo "PROGRAMS_PER_SM=$per_sm run $run" | tee -a "$OUT/bench.log"
              bench_with fisedit_compiler.execution.kernels.attention PROGRAMS_PER_SM "$per_sm" $ab $profile --out "$OUT/split_${per_sm}_$run"
            done
          done ;;
  ab)     test -d .device/base/fisedit_compiler || { echo "no earlier tree in .device/base" >&2; exit 2; }
          ab="--model ${MODEL:-sd15} --areas ${AREAS:-0.01,0.05,0.2} --layouts blob --no-reference --no-calibrate --no-prepare --compile-modes="
          out=$(cd "$OUT" && pwd)
          for run in 1 2; do
            profile=$([ $run = 1 ] && echo "--profile-area 0.05")
            bench $ab $profile --out "$out/new_$run"
            # python -m puts the working directory first on sys.path: run the earlier tree from its own
            (cd .device/base && PYTHONPATH=/tmp/site python3 -m fisedit_compiler.cli bench --reps 10 $ab $profile \
              --out "$out/base_$run" 2>&1 | grep -v -i "warn" | tee -a "$out/bench.log")
          done ;;
  masks)  python3 benchmarks/edit_quality.py --gpu-timing sd15 --out "$OUT/masks" 2>&1 | tee "$OUT/masks.log" ;;
  e2e)    python3 benchmarks/edit_e2e.py --model sd15 --dense-modes reduce-overhead \
            --json "$OUT/e2e_sd15.json" 2>&1 | grep -v -i warn | tee "$OUT/e2e.log" ;;
  e2e-ab) test -d .device/base/fisedit_compiler || { echo "no earlier tree in .device/base" >&2; exit 2; }
          e2e="$PWD/benchmarks/edit_e2e.py --model sd15 --dense-modes reduce-overhead --edits 4 --reps 2"
          out=$(cd "$OUT" && pwd)
          python3 $e2e --json "$out/e2e_new.json" 2>&1 | grep -v -i warn | tail -8 | tee "$out/e2e_new.log"
          # the same script on the earlier tree's package, imported from its own folder
          (cd .device/base && PYTHONPATH=/tmp/site:$PWD python3 $e2e --json "$out/e2e_base.json" 2>&1 \
            | grep -v -i warn | tail -8 | tee "$out/e2e_base.log") ;;
  # 50 steps x 1.4 GiB: 56 GiB (39 steps) stay on the H100, the rest is prefetched from pinned host memory.
  e2e-sdxl) python3 benchmarks/edit_e2e.py --model sdxl --cache-budget-gib 56 --reps 2 \
            --json "$OUT/e2e_sdxl.json" 2>&1 | tee "$OUT/e2e_sdxl.log" ;;
  shapes) python3 -m fisedit_compiler.shapes.train --out /tmp/shapes/weights --work /tmp/shapes/work \
            --minutes 7 --max-run-minutes 9.3 --archive "$OUT/shapes-weights.tar.gz" 2>&1 \
            | grep -v ImageProcessor | tee "$OUT/train.log"
          cp /tmp/shapes/work/samples.png /tmp/shapes/work/metrics.json "$OUT/" ;;
esac
