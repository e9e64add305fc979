"""SparseEngine: record a generation densely, then edit it sparsely, on the torch reference path.

``fisedit_compiler.compile(unet, config)`` returns a SparseEngine. The engine compiles lazily,
once per input signature (resolution, batch, dtypes, devices): capture, canonicalize, analyze,
sparsify, derive the cache set, build the record graph. A cache (``new_cache``) belongs to one
original generation: its signature, its timesteps and the config it was recorded with; every
edit is checked against it, and a failed call never changes it.

The captured graphs are the U-Net as it was when compiled: the engine fingerprints its module
state then (``module_state.ModuleState``) and refuses any call that finds it changed (FreeU,
attention processors, adapters, replaced parameters, swapped weight storages): compile again.
Weights changed in place keep the graphs valid but not a recording made before: each cache
keeps the weights' versions it was recorded with (``weight_versions``), and edits compare;
a write through ``param.data`` moves no version, so each cache also keeps the weights' norms
(``content_fingerprint``), compared at an edit pass's first step.
The full comparison costs ~0.4 ms of host time on SD1.5, and the norms one read of every
weight (3.4 ms for SD1.5 in fp16 on an H100, 0.28 s in fp32 on a 2-core CPU host), so
``edit`` runs both at the first step of each edit pass and, on the pass's later steps,
compares only the weights' identities, data addresses and version counters (~0.14 ms: ~0.04,
0.05 and 0.05 ms, the counters read before anyway; measured on a CPU host with
``fc.zoo.unet("sd15")``; ``_check_unchanged``).
"""

from __future__ import annotations

import inspect
import math
import time
import weakref

import torch
import torch.fx as fx

from .. import ir
from ..checks import check_bool, check_int, check_no_cross_attention_kwargs
from ..compiler.capture import (check_unet, example_inputs, flatten_inputs, latent_size,
                                raise_if_eager_fails, required_arguments)
from ..compiler.pipeline import (Program, build_program, check_kernels,
                                 describe_signature_change, device_of, trace)
from ..config import SparseConfig
from ..errors import FiseditError
from ..execution.derived_weights import tensor_versions, version_counters
from ..execution.plan import (Bucket, MaskPlan, capacity_buckets, image_resolution_hint,
                              validate_mask)
from ..graph_keys import (CACHE_INPUT, CHANNELS_LAST_KEYS, IN_PLACE_KEYS, PASS_VALUES_INPUT,
                          PLAN_INPUT)
from ..passes import registry
from .cuda_graph import CapturedSteps
from .edit_cache import EditCache
from .host_values import HostValues
from .module_state import ModuleState
from .pass_values import PassValues


# Inductor's options for the dense graph: CUDA graphs (mode "reduce-overhead") and 1x1 convs as
# matmuls, as in the strongest dense setting (``bench.tuned_unet``).
DENSE_COMPILE_OPTIONS = {"triton.cudagraphs": True, "conv_1x1_as_mm": True}


def input_signature(flat: dict) -> tuple:
    """What a program is compiled for: each tensor input's name, shape, dtype and device, in
    one order whatever the caller's (graphs are called by keyword, so another order must not
    make another program): the sample first, as messages show it, then by name. Entries that
    are not tensors (the backend's None for an input Dynamo dropped) are not part of it."""
    tensors = {name: value for name, value in flat.items() if isinstance(value, torch.Tensor)}
    return tuple((name, tuple(value.shape), value.dtype, str(value.device))
                 for name, value in sorted(tensors.items(),
                                           key=lambda item: (item[0] != "sample", item[0])))


class SparseEngine:
    """A U-Net compiled for incremental edits. See docs/design.md, "Public API", for the
    call sequence."""

    def __init__(self, unet, config: SparseConfig | None = None, *, _traces=None, _dense=None,
                 _state=None):
        check_unet(unet)
        if config is not None and not isinstance(config, SparseConfig):
            hint = (" (from a dict: fc.SparseConfig(**config))" if isinstance(config, dict)
                    else "")
            raise FiseditError(f"config must be a SparseConfig{hint}, got "
                               f"{type(config).__name__}")
        self.unet = unet
        self.config = config or SparseConfig()
        # Refused now rather than at the first program: the U-Net's device is where it runs.
        weight = next(unet.parameters())
        check_kernels(self.config, weight.device, weight.dtype)
        self._programs: dict[tuple, Program] = {}
        # Canonical graphs (and their compiled dense form) do not depend on the config, so
        # engines made by with_config share them: one capture and one compile per signature.
        self._traces: dict[tuple, fx.GraphModule] = {} if _traces is None else _traces
        self._dense: dict[tuple, object] = {} if _dense is None else _dense
        self._last_plan: tuple | None = None        # (mask key, MaskPlan), see plan()
        self._buckets: dict[tuple, list[Bucket]] = {}          # per level layout
        self._captured: dict[tuple, CapturedSteps] = {}        # per signature
        self._pass_values: dict[tuple, PassValues] = {}        # per signature
        # Timesteps read on the host without a synchronisation per step (_check_timestep).
        self._host_values = HostValues()
        # The U-Net's keyword inputs, read once: every record and edit checks against them.
        self._forward_params = {name: param for name, param in
                                inspect.signature(type(unet).forward).parameters.items()
                                if name != "self"}
        # What the input checks read of the module itself (once: it does not change with the
        # config): whether diffusers' own forward reads the inputs, and whether any attention
        # reads encoder_hidden_states (``_check_input_shapes``).
        self._stock_forward = stock_forward(unet)
        self._cross_attention = any(getattr(module, "is_cross_attention", False)
                                    for module in unet.modules())
        # The U-Net's module state when compiled: the captured graphs (shared with engines made
        # by with_config, so the state they were captured in is too) are of this state, and
        # every call that runs them checks it is still the U-Net's (``_check_unchanged``).
        self._state = ModuleState(unet) if _state is None else _state
        # The U-Net's weights (the tensors its captured graphs read), listed once: their
        # versions tell a recording made with other weights (``weight_versions``), and when the
        # programs' derived copies (packed, grouped) must be made again.
        self._weights = self._state.weights

    def weight_versions(self) -> tuple:
        """What tells the U-Net's parameters and buffers changed (``tensor_versions``): their
        version counters, which move with every in-place change (fine-tuning, a LoRA fused
        into the weights), and their storages' addresses (a ``.data`` assignment)."""
        return tensor_versions(self._weights)

    def with_config(self, config: SparseConfig) -> "SparseEngine":
        """An engine for the same U-Net under another config, sharing the captured graphs (and
        so the module state they were captured in)."""
        if config is None:
            # For SparseEngine, None means the defaults: here it would silently drop this
            # engine's settings. Anything else is checked there.
            raise FiseditError("with_config needs a SparseConfig, got None; for the defaults "
                               "pass fc.SparseConfig()")
        return SparseEngine(self.unet, config, _traces=self._traces, _dense=self._dense,
                            _state=self._state)

    # -- compilation ----------------------------------------------------------------------
    def signature(self, inputs: dict) -> tuple:
        """What a program is compiled for: ``input_signature`` of the U-Net call's tensors."""
        return input_signature(self.flat(inputs))

    def flat(self, inputs: dict) -> dict:
        """The call's tensor inputs under the graph's names, a number timestep made the tensor
        this U-Net makes of it (``capture.flatten_inputs``)."""
        return flatten_inputs(inputs, self.unet)

    def program(self, inputs: dict) -> Program:
        """The compiled program for ``inputs``' signature (compiled on first use)."""
        signature = self.signature(inputs)
        if signature not in self._programs:
            key = (signature, self.config.frontend)
            if key not in self._traces:
                self._traces[key] = trace(self.unet, inputs, self.config.frontend)
            self._programs[signature] = self._adopted(
                build_program(signature, self._traces[key], self.config))
        return self._programs[signature]

    def program_for_size(self, size: tuple[int, int]) -> Program:
        """A program at latent ``size``: a compiled one if any, else one for example inputs.

        Once a generation has been compiled, a mask at another size is refused: it is almost
        always an image-resolution or stale mask rather than a wish to recompile. Before that,
        a size that is a whole multiple of the U-Net's configured latent size is refused too:
        it is almost always the image's mask, and compiling the U-Net at that size (8x the
        latent's sides for a Stable Diffusion VAE) would only fail later, at the edit.
        """
        sizes = []
        for program in self._programs.values():
            if program.levels and tuple(program.levels[0]) == tuple(size):
                return program
            sizes.append(tuple(program.levels[0]) if program.levels else None)
        if sizes:
            validate_mask(torch.zeros(size, dtype=torch.bool), sizes[0])
        elif self.unet.config.get("sample_size") is not None:
            configured = latent_size(self.unet)
            hint = image_resolution_hint(tuple(size), configured)
            if hint:
                raise FiseditError(
                    f"the edit mask is {size[0]}x{size[1]} but this U-Net's latent is "
                    f"{configured[0]}x{configured[1]} (config.sample_size), and nothing has "
                    f"been compiled at {size[0]}x{size[1]}; {hint} (to edit a generation at a "
                    f"{size[0]}x{size[1]} latent, record it first)")
        return self.program(example_inputs(self.unet, batch=2, height=size[0], width=size[1]))

    # -- public API -----------------------------------------------------------------------
    def new_cache(self, num_steps: int = 1, device_budget_bytes: int | None = None) -> EditCache:
        """An empty cache for a generation of ``num_steps`` U-Net calls; steps beyond
        ``device_budget_bytes`` on the device are kept in pinned host memory."""
        return EditCache(num_steps, self.config, device_budget_bytes, owner=self)

    @torch.no_grad()
    def record(self, cache: EditCache, step: int = 0, **inputs) -> torch.Tensor:
        """Run the U-Net densely on ``inputs`` and record what edits of ``step`` will read."""
        step = self._check_cache(cache, step)
        versions = self._check_unchanged()
        self._check_inputs(inputs)
        if cache.weight_versions is None or step == 0:     # a generation's first step
            check_finite_inputs(self.flat(inputs))
        signature = self.signature(inputs)    # checked before compiling anything for it
        if cache.signature is not None and cache.signature != signature:
            raise FiseditError(
                "this cache belongs to a generation with other inputs: "
                f"{describe_signature_change(signature, cache.signature)}; "
                "use engine.new_cache() for a new generation")
        program = self.program(inputs)      # compiled already if the cache holds a step
        if cache.weight_versions is not None and cache.weight_versions != versions:
            raise FiseditError(
                "the U-Net's weights changed in place since this generation's first recorded "
                "step (a LoRA loaded or fused, fine-tuning): one recording must use one set of "
                "weights; record the whole generation again in engine.new_cache()")
        fingerprint = cache.weight_fingerprint
        if cache.weight_versions is None:
            # A new generation starts from the weights as they are: their values are kept for
            # edits to compare (``_check_unchanged``), and the derived copies made again where
            # the values moved since the copies were made without a version count (an EMA
            # model's copy_to writes param.data; counted moves were refreshed above).
            fingerprint = self._state.fingerprint()
            if self._copies_made_from_other(fingerprint=fingerprint):
                self.refresh_weights(fingerprint)
        flat = self.flat(inputs)
        timestep = self.host_timestep(flat)
        if timestep is not None and not bool(torch.isfinite(timestep).all()):
            raise FiseditError(f"the timestep is {_timestep_text(timestep)}, not finite; pass "
                               "the scheduler's timesteps")
        store: dict = {}
        try:
            output = program.record(**flat, **{CACHE_INPUT: store})
        except Exception:
            raise_if_eager_fails(self.unet, inputs)
            raise
        # Everything that can fail (an out-of-memory copy) is made before the cache changes,
        # so a failed record leaves the cache as it was.
        checked_inputs = ({name: value.clone() for name, value in flat.items()}
                          if self.config.check_inputs else None)
        # A recording starts from the weights as they are: pass constants kept from before
        # it could come from weights written without a version count (an EMA model's
        # param.data.copy_), so the next edit computes them afresh (dropping them changes
        # no result, so it may come before a put that fails).
        self._pass_values.clear()
        # The step is stored, then its bookkeeping set by plain assignments, nothing between
        # them that can fail.
        cache.put(step, store, channels_last=program.edit.meta.get(CHANNELS_LAST_KEYS, ()),
                  in_place=program.edit.meta.get(IN_PLACE_KEYS, ()))
        cache.signature = program.signature
        cache.weight_versions = versions
        cache.weight_fingerprint = fingerprint
        cache.timesteps[step] = timestep
        if checked_inputs is not None:
            cache.inputs[step] = checked_inputs
        return output

    def plan(self, mask, bucketed: bool | None = None) -> MaskPlan:
        """The mask plan of a bool ``[H, W]`` edit mask at latent resolution.

        ``bucketed`` (default: where edits run as CUDA graphs) makes the plan for the
        program's capacity buckets (``buckets``), so that its edits replay a graph captured
        for any mask of its bucket; otherwise the plan's shapes are the mask's own.
        """
        # Both checked before compiling a program for the mask's size (the size is the mask's).
        if bucketed is not None:
            check_bool("bucketed", bucketed)
        mask = validate_mask(mask, None)
        program = self.program_for_size(tuple(mask.shape))
        if not program.levels:
            raise FiseditError("this U-Net graph has no spatial levels, so there is nothing "
                               "to plan; run it densely")
        device = next(self.unet.parameters()).device
        if bucketed is None:
            bucketed = self._uses_graphs(device)
        # The last plan is kept and returned again for an identical mask: planning it again
        # would cost more than comparing the bytes.
        host = mask.detach().cpu()     # one copy: the key, and MaskPlan plans on the host
        key = (tuple(host.shape), str(host.dtype), host.numpy().tobytes(), bucketed)
        if self._last_plan is not None and self._last_plan[0] == key:
            return self._last_plan[1]
        plan = MaskPlan(host, program.levels, program.tiles, self.config.dilation,
                        self.config.thresholds_for(program.levels), device=device,
                        buckets=self.buckets(program) if bucketed else None)
        self._last_plan = (key, plan)
        return plan

    def buckets(self, program: Program) -> list[Bucket]:
        """The capacity buckets of ``program``'s levels under this config (computed once)."""
        key = (tuple(map(tuple, program.levels)), tuple(program.tiles))
        if key not in self._buckets:
            self._buckets[key] = capacity_buckets(
                program.levels, program.tiles, self.config.dilation,
                self.config.thresholds_for(program.levels), self.config.bucket_ratio)
        return self._buckets[key]

    @torch.no_grad()
    def prepare(self, cache: EditCache, step: int = 0, **inputs) -> dict:
        """Compile everything an edit of this generation can need, so that no edit compiles:
        the dense graph (the editing flow's probe steps and full-mask edits) and, where edits
        run as CUDA graphs, one captured edit step per capacity bucket (kernels tuned on the
        way; tuning results persist on disk). ``inputs`` are the recorded step's. Returns the
        time spent, in seconds, and the number of graphs captured. Refused before any work as
        edit refuses them: an unrecorded step, inputs of another signature than the cache's
        (they would compile a program no edit of this generation uses)."""
        step = self._check_cache(cache, step)
        self._check_recorded_step(cache, step, inputs)
        self._check_unchanged(cache, contents=True)
        program = self.program(inputs)
        device = device_of(program.signature)
        started = time.perf_counter()
        captured = 0
        if self._uses_graphs(device):
            flat = self.flat(inputs)
            for _ in range(3):      # torch.compile's CUDA graphs record on a later call
                self._compiled_dense(program, flat)
            steps = self._captured_steps(program)
            store = cache.store_on(step, device)
            seed = torch.zeros(program.levels[0], dtype=torch.bool)
            seed[0, 0] = True
            values = self._values_for(program, flat, cache, new_pass=True)
            for bucket in self.buckets(program):
                plan = MaskPlan(seed, program.levels, program.tiles, self.config.dilation,
                                self.config.thresholds_for(program.levels), device=device,
                                buckets=[bucket])
                if not steps.captured(plan):
                    steps.capture(plan, flat, store, values)
                    captured += 1
            torch.cuda.synchronize(device)
        return {"prepare_s": time.perf_counter() - started, "graphs_captured": captured}

    def _uses_graphs(self, device) -> bool:
        return self.config.cuda_graphs and torch.device(device).type == "cuda"

    def captured_steps(self, **inputs) -> CapturedSteps:
        """The CUDA-graph steps of ``inputs``' program (for benchmarks and inspection)."""
        program = self.program(inputs)
        device = device_of(program.signature)
        if not self._uses_graphs(device):
            why = ("config.cuda_graphs is off" if torch.device(device).type == "cuda"
                   else f"the inputs are on {device}")
            raise FiseditError(
                f"captured_steps needs the CUDA-graph path, but {why}; pass inputs on a CUDA "
                "device to an engine with SparseConfig(cuda_graphs=True)")
        return self._captured_steps(program)

    def _captured_steps(self, program: Program) -> CapturedSteps:
        if program.signature not in self._captured:
            self._captured[program.signature] = CapturedSteps(program.edit)
        return self._captured[program.signature]

    @torch.no_grad()
    def edit(self, cache: EditCache, step: int = 0, plan: MaskPlan | None = None,
             **inputs) -> torch.Tensor:
        """Recompute only the planned region of step ``step`` for the edited ``inputs``.

        ``plan`` is required (``engine.plan(mask)``; its None default only lets it follow
        ``step``'s). Refused before any work: another engine's cache, an unrecorded step, inputs
        of another signature, a plan for other levels or tiles (``check_plan``), a U-Net changed
        since it was compiled; and, for a plan that reads recorded values, a timestep other than
        the recorded one and weights changed since the recording. A plan that runs every level
        dense, on the CUDA-graph path, is the dense step itself (``dense``): it reads nothing
        recorded, so those last checks do not apply to it. The U-Net is compared in full at the
        first step of an edit pass (any call that is not the next step of the cache's last edit
        with the same plan), weights' values included (``content_fingerprint``), and by its
        weights' identities and versions on the pass's other steps (module docstring)."""
        if not isinstance(plan, MaskPlan):
            raise FiseditError(f"edit needs plan=engine.plan(mask), got {type(plan).__name__}")
        step = self._check_cache(cache, step)
        self._check_recorded_step(cache, step, inputs)
        program = self.program(inputs)
        self.check_plan(plan, program)
        flat = self.flat(inputs)
        device = device_of(program.signature)
        graphs = self._uses_graphs(device)
        full = not _continues_pass(cache, plan, step)
        # The weights' values at a pass's first step, unless its caller has just read them.
        contents = full and not cache.weight_values_checked
        if full:
            cache.weight_values_checked = False
            check_finite_inputs(flat)
        if plan.full and graphs:
            # Nothing to skip: the dense U-Net, compiled, is the fastest way to the same value.
            # It reads nothing recorded, so the checks against the recording below (which
            # guard against mixing recorded values with new ones) have nothing to guard. Its
            # graph is the compiled U-Net's, so the U-Net must still be that one.
            self._check_unchanged(full=full, contents=contents)
            output = self._compiled_dense(program, flat)
        else:
            self._check_timestep(cache, step, flat)
            self._check_unchanged(cache, full=full, contents=contents)
            if self.config.check_inputs:
                self._check_outside_mask(cache, step, plan, flat)
            output = self._edit_step(program, plan, flat, cache.store_on(step, device), cache,
                                     graphs, new_pass=full)
            if step + 1 < cache.num_steps:
                cache.prefetch(step + 1, device)    # overlaps this step's compute
        cache.last_edit = (weakref.ref(plan), step)     # after success: the pass goes on
        return output

    def _edit_step(self, program: Program, plan: MaskPlan, flat: dict, store: dict,
                   cache: EditCache, graphs: bool, new_pass: bool):
        if plan.empty and program.output_key in store:
            return store[program.output_key].clone()   # nothing active: the recorded output
        values = self._values_for(program, flat, cache, new_pass)
        if graphs:
            return self._captured_steps(program)(plan, flat, store, values)
        extra = {} if values is None else {PASS_VALUES_INPUT: values}
        return program.edit(**flat, **{PLAN_INPUT: plan, CACHE_INPUT: store}, **extra)

    def _values_for(self, program: Program, flat: dict, cache: EditCache,
                    new_pass: bool) -> tuple | None:
        """The values of ``program``'s pass constants for ``flat`` (computed once per pass,
        and not again for a pass with the same inputs under the same weights: ``PassValues``),
        or None when its edit graph has none. The weights are told by ``cache``'s recording:
        a pass's first step has checked the U-Net's against its version counters and values
        (``_check_unchanged``; EditSession checks them just before), and a later step refuses
        any counted change. A recording without the values read cannot vouch for them (None):
        its passes compute the values afresh."""
        if program.pass_constants is None:
            return None
        if program.signature not in self._pass_values:
            self._pass_values[program.signature] = PassValues(program.pass_constants)
        weights = None if cache.weight_fingerprint is None else \
            (cache.weight_versions, cache.weight_fingerprint)
        return self._pass_values[program.signature](flat, weights, new_pass)

    def add_program(self, program: Program) -> Program:
        """Use ``program`` (compiled elsewhere, e.g. by the "fisedit" backend) for its signature,
        unless one is already there; returns the one in use."""
        return self._programs.setdefault(program.signature, self._adopted(program))

    def _adopted(self, program: Program) -> Program:
        """``program``, its derived copies marked as made from the weights' versions now
        where no engine has refreshed them yet: they are built from the weights as they are
        when first read, and counted moves after that are refreshes (their values are read at
        the next pass's first step)."""
        if program.derived.made_from is None:
            program.derived.made_from = (version_counters(self._weights), None)
        return program

    def has_program(self, signature: tuple) -> bool:
        """Whether a program for ``signature`` has been compiled or added."""
        return signature in self._programs

    def refresh_weights(self, fingerprint: tuple | None = None) -> None:
        """Make every program's derived weight copies (the conv kernel's packed weights,
        grouped projections; the dense graphs read them too) again, in place, so that captured
        CUDA graphs use the U-Net's current weights. ``edit`` and ``dense`` call it when the
        weights' version counters moved since the copies were made (eager edits notice by
        themselves too), ``edit`` at a pass's first step when their values did
        (``content_fingerprint``: ``param.data`` writes move no counter), and ``record`` at a
        new generation's first step when their values moved; recordings made with the old
        weights are refused by ``edit``: record again. ``fingerprint``: the weights'
        ``content_fingerprint``, where the caller has just read it."""
        if fingerprint is not None and not isinstance(fingerprint, tuple):
            raise FiseditError(f"refresh_weights' fingerprint must be the weights' "
                               f"content_fingerprint (a tuple) or None, got "
                               f"{type(fingerprint).__name__}")
        versions = version_counters(self._weights)
        for derived in self._derived_copies():
            derived.refresh()
            derived.made_from = (versions, fingerprint)

    def _derived_copies(self) -> list:
        """The derived copies this engine's programs and dense graphs read (each once: the
        dense graphs' may be another engine's)."""
        copies = [program.derived for program in self._programs.values()]
        copies += [derived for _, derived in self._dense.values()]
        return list({id(derived): derived for derived in copies}.values())

    def _copies_made_from_other(self, counters: tuple | None = None,
                                fingerprint: tuple | None = None) -> bool:
        """Whether a derived copy was made from weights other than the U-Net's now: other
        version ``counters``, or, where given, other values (``fingerprint``; a copy whose
        values were not read when it was made counts). Another engine that shares a copy may
        have refreshed it for its own weights: what counts is the copy's record."""
        for derived in self._derived_copies():
            versions, values = derived.made_from
            if (counters is not None and versions != counters) or (
                    fingerprint is not None and values != fingerprint):
                return True
        return False

    def _refresh_if_weights_moved(self, counters: tuple | None = None) -> None:
        """``refresh_weights`` if the weights' version counters moved since the copies were
        made (``counters``: the current ones, if the caller has read them). Their storages
        cannot have moved: that is a changed U-Net, refused before (``_check_unchanged``)."""
        if counters is None:
            counters = version_counters(self._weights)
        if self._copies_made_from_other(counters):
            self.refresh_weights()

    @torch.no_grad()
    def dense(self, **inputs) -> torch.Tensor:
        """The U-Net's output on ``inputs``, computed densely on the fastest path: on CUDA (with
        ``config.cuda_graphs``) the canonical graph tuned as a diffusers user tunes for speed
        (``Program.dense_graph``: channels-last conv weights, grouped projections) under
        ``torch.compile`` with CUDA graphs and 1x1 convs as matmuls, compiled once per
        signature and shared by ``with_config`` engines; elsewhere the module itself. Full-mask
        edits, edits whose plan runs every level dense, and the editing flow's dense probe
        steps use it. Like the U-Net, it computes on NaN or infinite inputs without refusing
        them (a check would synchronise every call; ``record`` and ``edit`` check once per
        generation and per edit pass)."""
        self._check_inputs(inputs)
        if not (self.config.cuda_graphs and inputs["sample"].is_cuda):
            return self.unet(**inputs)[0]      # the module as it is now: nothing to check
        self._check_unchanged()                # the compiled graph is the compiled U-Net's
        return self._compiled_dense(self.program(inputs), self.flat(inputs))

    def _compiled_dense(self, program: Program, flat: dict) -> torch.Tensor:
        if program.signature not in self._dense:
            # The dense graph reads this program's derived copies, kept with it for refreshes.
            self._dense[program.signature] = (
                torch.compile(program.dense_graph(), options=DENSE_COMPILE_OPTIONS),
                program.derived)
        self._refresh_if_weights_moved()
        compiled, _ = self._dense[program.signature]
        # Cloned: the next replay of the compiled CUDA graph overwrites its output.
        return compiled(**flat).clone()

    def stats(self, plan: MaskPlan) -> dict:
        """Dense, sparse (what the sparse ops compute, halos and tiles included) and ideal
        (dense x the edit's active fraction) MACs, and the per-level fractions. ``plan`` is
        checked as ``edit`` checks it: another engine's plan would count its tiles."""
        if not isinstance(plan, MaskPlan):
            raise FiseditError(f"stats needs plan=engine.plan(mask), got {type(plan).__name__}")
        program = self.program_for_size(plan.level_sizes[0])
        self.check_plan(plan, program)
        rows = node_macs(program, plan, self.config)
        return {
            "dense_macs": sum(r["dense_macs"] for r in rows),
            "sparse_macs": sum(r["sparse_macs"] for r in rows),
            "ideal_macs": sum(r["ideal_macs"] for r in rows),
            "mask_fraction": plan.raw_fraction,
            "levels": [{"level": l.index, "size": list(l.size), "tile": l.tile,
                        "dense": l.dense, "fraction": l.fraction,
                        "tiles": int(l.tiles.shape[0])} for l in plan.levels],
        }

    # -- validation -----------------------------------------------------------------------
    def _check_cache(self, cache, step) -> int:
        """Check that ``cache`` is this engine's and return ``step`` as an index into it."""
        if not isinstance(cache, EditCache):
            raise FiseditError(f"expected an EditCache from engine.new_cache(), got "
                               f"{type(cache).__name__}")
        if cache.config != self.config:
            raise FiseditError("this cache was made by an engine with a different SparseConfig; "
                               "use the engine that created it or record a new cache")
        if cache.owner is not self:
            # Another engine's cache holds another U-Net's (or another compile's) values: an
            # edit against it would mix weights without any error.
            raise FiseditError("this cache was made by another engine (engine.new_cache() of "
                               "another fc.compile call or U-Net); edit with the engine that "
                               "recorded it, or record a new cache with this engine")
        return check_int("step", step, minimum=0, maximum=cache.num_steps - 1)

    def _check_recorded_step(self, cache, step: int, inputs: dict) -> None:
        """``inputs`` for reading recorded ``step`` of ``cache`` (edit, prepare): the step
        recorded, the inputs valid (``_check_inputs``) and of the cache's signature. Checked
        before compiling anything for them."""
        cache.check_recorded(step)
        self._check_inputs(inputs)
        signature = self.signature(inputs)
        if cache.signature != signature:
            raise FiseditError(
                "the inputs do not match the recorded generation: "
                f"{describe_signature_change(signature, cache.signature)}; edits must keep "
                "the resolution, batch and dtypes of the original and pass each input in its "
                "recorded form (a timestep as a tensor of the recorded shape)")

    def check_plan(self, plan: MaskPlan, program: Program, *, remedy: str = "") -> None:
        """Refuse a plan made for other levels or tiles than ``program``'s (another engine's,
        another config's, another resolution's): its tables would index the wrong tensors.
        ``edit``, the oracle (``oracle.masked_dense``) and the backend's recordings check their
        plans here (``remedy``: how the caller makes a plan, for the message). A plan's
        dilation and dense thresholds are its own (calibration edits with candidate
        thresholds): any plan of the program's levels and tiles edits exactly its region."""
        plan_tiles = [level.tile for level in plan.levels]
        if plan.level_sizes != program.levels or plan_tiles != program.tiles:
            remedy = remedy or (f"make the plan with this engine: engine.plan(mask) for a mask "
                                f"at {program.levels[0][0]}x{program.levels[0][1]}")
            raise FiseditError(
                f"the plan was made for levels {plan.level_sizes} with tiles {plan_tiles}, but "
                f"this engine's generation has levels {program.levels} with tiles "
                f"{program.tiles} (SparseConfig.tile={self.config.tile!r}); {remedy}")

    def _check_inputs(self, inputs: dict) -> None:
        """The U-Net keyword inputs: names of its forward, tensors (or dicts of tensors), the
        required ones present, on the U-Net's device; for diffusers' own forward, the
        added_cond_kwargs keys its config reads and the sample's channels and text states'
        width its config takes. Checked before any capture, so a typo, a stray keyword or a
        wrong shape is an error here, not an export traceback or a silently dropped
        argument."""
        params = self._forward_params
        named = [name for name, param in params.items()
                 if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]
        # Dict inputs may come flattened, as the captured graph names them
        # (added_cond_kwargs_text_embeds); the backend passes them so. A forward with
        # **kwargs (a subclass passing them on to diffusers' forward) takes any name.
        takes_any = any(param.kind == param.VAR_KEYWORD for param in params.values())
        unknown = sorted(name for name in inputs if name not in named
                         if not any(name.startswith(p + "_") for p in named))
        if unknown and not takes_any:
            raise FiseditError(
                f"unknown U-Net input(s) {', '.join(unknown)}; {type(self.unet).__name__} takes "
                f"{', '.join(named)}")
        # A required input passed as None is the caller's choice (Kandinsky 2.2's pipeline
        # passes encoder_hidden_states=None): only an absent one is missing.
        missing = [name for name in required_arguments(params.values()) if name not in inputs]
        if missing:
            raise FiseditError(f"missing U-Net input(s) {', '.join(missing)}; pass them as "
                               "keywords, as for unet(**inputs)")
        if inputs.get("return_dict", False):
            raise FiseditError("the engine returns the output sample tensor; drop "
                               "return_dict=True (or pass return_dict=False)")
        check_plain_call(inputs)
        if self._stock_forward:
            # Before the tensor checks, which would call a non-dict one "not a tensor"; again
            # in check_ignored_inputs below, which the backend shares.
            _check_added_cond_keys(self.unet, inputs)
        device = next(self.unet.parameters()).device
        for name, value in inputs.items():
            if name == "return_dict" or value is None:
                continue
            if name == "cross_attention_kwargs":
                check_no_cross_attention_kwargs(value)
            if name == "timestep" and isinstance(value, (int, float)) and \
                    not isinstance(value, bool):
                continue
            for tensor in _leaves(value):
                if not isinstance(tensor, torch.Tensor):
                    raise FiseditError(f"U-Net input {name} must be a tensor (or a dict or list "
                                       f"of tensors), got {type(tensor).__name__}")
                if tensor.device.type == "meta":
                    raise FiseditError(f"U-Net input {name} is on the meta device, which holds "
                                       f"shapes but no values; make it with values on {device}")
                # (A 0-d tensor, such as a timestep, is a scalar the U-Net moves itself.)
                if tensor.device != device and tensor.dim() > 0:
                    raise FiseditError(f"U-Net input {name} is on {tensor.device} but the "
                                       f"U-Net is on {device}; move it with .to({str(device)!r})")
        if self._stock_forward:
            check_ignored_inputs(self.unet, inputs)
            _check_input_shapes(self.unet, inputs, self._cross_attention)

    def _check_unchanged(self, cache: EditCache | None = None, *, full: bool = True,
                         contents: bool = False) -> tuple | None:
        """Refuse a call on a U-Net whose module state changed since it was compiled (its
        graphs are of the old one; ``ModuleState``) and, with ``cache``, a recording made with
        other weights; then refresh the derived copies if the weights changed in place, so that
        captured CUDA graphs read current copies. EditSession runs it (in full) before an edit's
        first U-Net call.

        ``full`` compares everything (~0.4 ms on SD1.5); otherwise only the weights'
        identities, data addresses and version counters (~0.14 ms on a CPU host), which is
        what ``edit`` runs on the later steps of an edit pass, the first step having compared
        everything: a weight replaced or reassigned mid-pass (a step-end callback fusing a
        LoRA) is refused at once, a change of another kind (FreeU enabled) at the next pass's
        first step. Anything found moved there is then compared in full, for the message.
        ``contents`` (an edit pass's first step, ``prepare``, EditSession before an edit) also
        reads the weights' values (``content_fingerprint``, one pass over them), which tells
        a write through ``param.data`` since the recording, and since the derived copies
        were made. Returns the weights' versions when compared in full (``weight_versions``),
        else None."""
        if not full:
            counters = version_counters(self._weights)
            if (self._state.same_tensors() and self._state.same_storages()
                    and (cache is None or counters == cache.weight_versions[0])):
                self._refresh_if_weights_moved(counters)
                return None
        versions = self.weight_versions()
        fingerprint = self._state.fingerprint() if contents else None
        changes = self._state.changes(versions[1])
        if changes:
            raise FiseditError(
                f"the U-Net changed since it was compiled: {self._state.describe(changes)}. "
                "The engine's graphs were captured from the U-Net as it was, and would compute "
                "the old one (or mix the two) without a word; compile it again after the "
                "change (fc.compile(unet); a new EditSession; for the backend, a new "
                "fc.recording) and record the generation again, or undo the change")
        if cache is not None and cache.weight_versions is not None and \
                cache.weight_versions != versions:
            raise FiseditError(
                "the U-Net's weights were written in place after this generation was recorded "
                "(a LoRA loaded or fused, load_state_dict, fine-tuning; a write counts even "
                "where it restores the same values): its recorded values may no longer match "
                "the weights an edit would use, and the edit would mix the two; record the "
                "generation again with the current weights (engine.record into "
                "engine.new_cache(), EditSession.generate, or for the backend a new "
                "fc.recording)")
        if fingerprint is not None and cache is not None and \
                cache.weight_fingerprint not in (None, fingerprint):
            raise FiseditError(
                "the U-Net's weights were written after this generation was recorded, through "
                "param.data (an EMA model's copy_to, w.data += delta), which moves no version "
                "counter: its recorded values no longer match the weights an edit would use, "
                "and the edit would mix the two; record the generation again with the current "
                "weights (engine.record into engine.new_cache(), EditSession.generate, or for "
                "the backend a new fc.recording), or write the weights back")
        if fingerprint is not None and self._copies_made_from_other(fingerprint=fingerprint):
            self.refresh_weights(fingerprint)
        else:
            self._refresh_if_weights_moved(versions[0])
        return versions

    def host_timestep(self, flat: dict) -> torch.Tensor | None:
        """The timestep of the flat inputs ``flat`` as a host tensor of its own (None where
        there is none). A pipeline's timesteps are views of one device tensor, which
        ``HostValues`` copies once while it is unchanged: the later steps of a run read it
        without synchronising with the GPU."""
        timestep = flat.get("timestep")
        return None if timestep is None else self._host_values.read(timestep).clone()

    def _check_timestep(self, cache, step, flat) -> None:
        """Refuse a timestep other than the one ``step`` was recorded at, both compared on the
        host (``host_timestep``)."""
        recorded, new = cache.timesteps.get(step), self.host_timestep(flat)
        if recorded is None or new is None:
            return
        if not torch.equal(recorded, new):
            raise FiseditError(
                f"step {step} was recorded at timestep {_timestep_text(recorded)} but the "
                f"edit passes {_timestep_text(new)}; edits must follow the recorded "
                "scheduler timesteps (same scheduler and step count, and an img2img "
                "pipeline's strength)")

    @staticmethod
    def _check_outside_mask(cache, step, plan, flat) -> None:
        # Text and added conditions may change freely.
        if plan.differs_outside(flat["sample"], cache.inputs[step]["sample"]):
            raise FiseditError(
                "the edited sample differs from the recorded one outside the edit mask; blend "
                "the latents with the recorded ones outside the mask, or enlarge the mask")


def _continues_pass(cache: EditCache, plan: MaskPlan, step: int) -> bool:
    """Whether an edit of ``step`` with ``plan`` is the next step of the edit pass the cache's
    last edit belongs to (same plan object, the following step): the U-Net was compared in full
    at that pass's first step, and each later step compares its weights (``edit``)."""
    if cache.last_edit is None:
        return False
    last_plan, last_step = cache.last_edit
    return last_plan() is plan and step == last_step + 1


def stock_forward(unet) -> bool:
    """Whether ``unet`` reads its inputs as diffusers' UNet2DConditionModel or UNet2DModel
    does (a subclass may override how): the config-based input checks know only those."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(unet, UNet2DConditionModel):
        base, methods = UNet2DConditionModel, ("forward", "get_aug_embed",
                                               "process_encoder_hidden_states")
    else:
        base, methods = UNet2DModel, ("forward",)
    return all(getattr(type(unet), name, None) is getattr(base, name, None) for name in methods)


# The added_cond_kwargs keys diffusers' UNet2DConditionModel reads: by addition_embed_type
# (get_aug_embed), and, where an encoder_hid_proj is set, by encoder_hid_dim_type
# (process_encoder_hidden_states). It reads no other key, anywhere in forward.
_AUG_EMBED_KEYS = {None: (), "text": (), "text_image": ("text_embeds", "image_embeds"),
                   "text_time": ("text_embeds", "time_ids"), "image": ("image_embeds",),
                   "image_hint": ("image_embeds", "hint")}
_HID_PROJ_KEYS = {"text_proj": (), "text_image_proj": ("image_embeds",),
                  "image_proj": ("image_embeds",), "ip_image_proj": ("image_embeds",)}


def _check_added_cond_keys(unet, inputs: dict) -> None:
    """Refuse added_cond_kwargs keys the U-Net's config does not read (a typo such as
    ``time_id``): diffusers ignores them, and the graph would take them as inputs of a new
    program. Configs whose keys are not known exactly refuse none."""
    cfg = unet.config
    addition = cfg.get("addition_embed_type")
    if addition not in _AUG_EMBED_KEYS:
        return
    read, source = set(_AUG_EMBED_KEYS[addition]), f"addition_embed_type={addition!r}"
    if getattr(unet, "encoder_hid_proj", None) is not None:
        projection = cfg.get("encoder_hid_dim_type")
        if projection not in _HID_PROJ_KEYS:
            return
        read |= set(_HID_PROJ_KEYS[projection])
        source += f", encoder_hid_dim_type={projection!r}"
    value = inputs.get("added_cond_kwargs")
    if value is not None and not isinstance(value, dict):
        raise FiseditError(f"added_cond_kwargs must be a dict of tensors, got "
                           f"{type(value).__name__}")
    keys = list(value or {})
    # Flattened, as the backend passes them: added_cond_kwargs_<key>[_<list index>].
    prefix = "added_cond_kwargs_"
    keys += [name[len(prefix):] for name in inputs if name.startswith(prefix)]
    stray = sorted(key for key in keys if not any(
        key == known or key.startswith(known + "_") for known in read))
    if stray:
        raise FiseditError(
            f"added_cond_kwargs has key(s) {', '.join(map(repr, stray))} that this U-Net does "
            f"not read (with {source} it reads {', '.join(sorted(read)) or 'none'}), so they "
            "would be ignored; correct the key's name, or drop it")


def check_ignored_inputs(unet, inputs: dict) -> None:
    """Refuse inputs diffusers' forward drops without a word: ``added_cond_kwargs`` keys its
    config does not read, class labels for a U-Net without a class embedding
    (``class_embed_type`` and ``num_class_embeds`` unset), and a ControlNet's mid-block residual
    without its down-block residuals (diffusers adds the residuals only as a pair; down-block
    residuals alone are a T2I-Adapter's). ``inputs`` as the U-Net's forward takes them, or
    flattened as captured graphs name them (the backend checks the call's arguments with it,
    since Dynamo drops an input the graph does not read)."""
    _check_added_cond_keys(unet, inputs)
    if inputs.get("class_labels") is not None and getattr(unet, "class_embedding", 0) is None:
        raise FiseditError(
            "class_labels were given, but this U-Net has no class embedding (its config sets "
            "neither class_embed_type nor num_class_embeds), so they would be ignored; drop "
            "class_labels")
    down = "down_block_additional_residuals"
    has_down = inputs.get(down) is not None or any(name.startswith(down + "_")
                                                   for name in inputs)
    if inputs.get("timestep_cond") is not None and getattr(
            getattr(unet, "time_embedding", None), "cond_proj", None) is None:
        # diffusers calls the missing projection (a TypeError naming nothing given).
        raise FiseditError("timestep_cond was given, but this U-Net's config has no "
                           "time_cond_proj_dim (no projection reads it); drop timestep_cond")
    if (isinstance(inputs.get(down), tuple)
            and inputs.get("mid_block_additional_residual") is None):
        # diffusers' deprecated T2I-Adapter form: it pops the residuals from a list.
        raise FiseditError(
            "down_block_additional_residuals without mid_block_additional_residual is "
            "diffusers' deprecated T2I-Adapter form, which needs a list; pass an adapter's "
            "residuals as down_intrablock_additional_residuals=[...], or a ControlNet's as "
            "down_block_additional_residuals with mid_block_additional_residual")
    if inputs.get("mid_block_additional_residual") is not None and not has_down:
        raise FiseditError(
            "mid_block_additional_residual was given without down_block_additional_residuals, "
            "so diffusers would ignore it (it adds a ControlNet's residuals only as a pair); "
            "pass both, as a ControlNet returns them, or drop it")


def _check_input_shapes(unet, inputs: dict, cross_attention: bool) -> None:
    """The sample's channels, batch and dtype, the text states' width, batch and dtype, and the
    timestep's shape, against the config and the weights: a wrong one is otherwise an error
    from inside export (a fake-tensor one, with a screenful of logs), after capture started."""
    cfg = unet.config
    sample = inputs.get("sample")
    # An image_hint U-Net (Kandinsky 2.2 ControlNet) concatenates the hint's embedding to the
    # sample, so its conv_in takes more channels than the sample has.
    if isinstance(sample, torch.Tensor) and cfg.get("addition_embed_type") != "image_hint":
        channels = cfg.in_channels
        if sample.dim() != 4 or sample.shape[1] != channels:
            raise FiseditError(
                f"U-Net input sample has shape {tuple(sample.shape)} but this U-Net takes "
                f"[batch, {channels}, height, width] (config.in_channels={channels}); pass "
                "latents with the U-Net's channels (an inpainting or image-conditioned U-Net "
                "takes its conditioning concatenated to the latents, as its pipeline does)")
    # The dtype conv_in reads the sample in (the attentions read the text states in the same).
    dtype = unet.conv_in.weight.dtype
    if isinstance(sample, torch.Tensor):
        _check_input_dtype("sample", sample, dtype)
    batch = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() else None
    if batch == 0:
        raise FiseditError(f"U-Net input sample has an empty batch (shape "
                           f"{tuple(sample.shape)}); pass at least one latent")
    states = inputs.get("encoder_hidden_states")
    expected = _text_width(unet, cross_attention)
    if isinstance(states, torch.Tensor) and expected is not None:
        width, source = expected
        if states.dim() == 0 or states.shape[-1] != width:
            raise FiseditError(
                f"U-Net input encoder_hidden_states has shape {tuple(states.shape)} but this "
                f"U-Net takes a last dimension of {width} ({source}); pass the hidden states "
                "of the text encoder the U-Net belongs with (another model's encoder gives "
                "another width)")
    if isinstance(states, torch.Tensor) and _reads_text_states(unet, cross_attention):
        _check_input_dtype("encoder_hidden_states", states, dtype)
        if batch is not None and states.dim() and states.shape[0] != batch:
            raise FiseditError(
                f"U-Net input encoder_hidden_states has a batch of {states.shape[0]} but the "
                f"sample has {batch}; pass one row of text states per latent (with classifier-"
                "free guidance both are [unconditional, conditional], the latents repeated)")
    key_mask = inputs.get("encoder_attention_mask")
    # Checked where the attentions' keys are the text states' tokens: a projection of the
    # states (Kandinsky's adds image tokens) or an IP-Adapter's keys are left to export.
    if isinstance(key_mask, torch.Tensor) and isinstance(states, torch.Tensor) and \
            states.dim() == 3 and cross_attention and \
            getattr(unet, "encoder_hid_proj", None) is None:
        tokens = states.shape[1]
        # diffusers reads [batch, tokens]; [batch, 1, ..., tokens] broadcasts the same way.
        if key_mask.dim() < 2 or key_mask.shape[0] != states.shape[0] or \
                key_mask.shape[-1] != tokens or any(size != 1 for size in key_mask.shape[1:-1]):
            raise FiseditError(
                f"U-Net input encoder_attention_mask has shape {tuple(key_mask.shape)} but the "
                f"text states are {tuple(states.shape)}; pass one row per text state over its "
                f"tokens, shape [{states.shape[0]}, {tokens}] (1 keeps a token, 0 masks it)")
    timestep = inputs.get("timestep")
    if isinstance(timestep, torch.Tensor) and (timestep.is_complex()
                                               or timestep.dtype == torch.bool):
        # diffusers casts it to a real dtype, dropping the imaginary part with a warning.
        raise FiseditError(
            f"U-Net input timestep is {str(timestep.dtype).removeprefix('torch.')}; pass a "
            "real timestep (an int or float tensor: the scheduler's timesteps)")
    if isinstance(timestep, torch.Tensor) and batch is not None and (
            timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch))):
        raise FiseditError(
            f"U-Net input timestep has shape {tuple(timestep.shape)} but the sample's batch is "
            f"{batch}; pass one timestep (a number or 0-d tensor) or one per latent "
            f"(shape [{batch}])")


def _check_input_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """An input the U-Net multiplies by its weights must have their dtype: diffusers does not
    convert it, and torch refuses the mix."""
    if tensor.dtype != dtype:
        raise FiseditError(
            f"U-Net input {name} is {str(tensor.dtype).removeprefix('torch.')} but the U-Net's "
            f"weights are {str(dtype).removeprefix('torch.')}; convert it with "
            f".to({dtype}) (or the U-Net, before compiling it)")


def _reads_text_states(unet, cross_attention: bool) -> bool:
    """Whether diffusers' forward reads ``encoder_hidden_states`` (in the cross-attentions, an
    addition embedding of type "text" or a text projection): an ``image_proj`` projection
    replaces them unread, and a U-Net without any of these ignores them."""
    projection = getattr(unet, "encoder_hid_proj", None) is not None
    kind = unet.config.get("encoder_hid_dim_type")
    if projection and kind == "image_proj":
        return False
    return (cross_attention or projection
            or unet.config.get("addition_embed_type") == "text")


def _text_width(unet, cross_attention: bool) -> tuple[int, str] | None:
    """The width ``encoder_hidden_states`` must have and the config field that sets it, as
    diffusers' forward reads the states; None where nothing reads them or the config does
    not tell the width exactly (then nothing is refused)."""
    cfg = unet.config
    projection = cfg.get("encoder_hid_dim_type")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        # process_encoder_hidden_states: a text projection reads the states at encoder_hid_dim
        # (an IP-Adapter keeps one as text_encoder_hid_proj); image_proj replaces them with the
        # projected image embeddings, unread; ip_image_proj passes them on as they are.
        text_projection = projection in ("text_proj", "text_image_proj") or (
            projection == "ip_image_proj"
            and getattr(unet, "text_encoder_hid_proj", None) is not None)
        if text_projection:
            width = cfg.get("encoder_hid_dim")
            return (width, "config.encoder_hid_dim") if isinstance(width, int) else None
        if projection != "ip_image_proj":
            return None
    # The states reach the cross-attentions (and an addition embedding of type "text") as
    # they are: at cross_attention_dim, one number or one per block, which must then agree.
    if not cross_attention and cfg.get("addition_embed_type") != "text":
        return None
    dims = cfg.get("cross_attention_dim")
    dims = set(dims) if isinstance(dims, (list, tuple)) else {dims}
    width = dims.pop() if len(dims) == 1 else None
    return (width, "config.cross_attention_dim") if isinstance(width, int) else None


def _timestep_text(timestep: torch.Tensor) -> str:
    """A timestep for a message: its one value, or each sample's where they differ."""
    values = timestep.flatten().tolist()
    if len(set(values)) <= 1:
        return str(values[:1])
    return str(values[:8])[:-1] + (", ...]" if len(values) > 8 else "]")


def check_finite_inputs(flat: dict) -> None:
    """Refuse NaN or infinite input values (noise or text states gone wrong upstream): the
    U-Net would spread them over the whole output, and the recording or edit would keep them.
    A reduction per input and one host read, so it runs where a call reads the host anyway:
    a generation's first recorded step (step 0, or the first into a new cache) and an edit
    pass's first step (later steps' inputs come from the U-Net's own outputs and the
    scheduler). An attention mask given as an additive bias holds -inf where it excludes
    keys, so a mask (an input named ``*mask*``) may hold -inf, but not NaN or +inf."""
    floats = {name: value for name, value in flat.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point()}
    if not floats:
        return
    device = next(iter(floats.values())).device
    finite = torch.stack([(_finite_or_excluded(value) if "mask" in name
                           else torch.isfinite(value)).all().to(device)
                          for name, value in floats.items()])
    if bool(finite.all()):
        return
    names = [name for name, ok in zip(floats, finite.tolist()) if not ok]
    raise FiseditError(f"U-Net input(s) {', '.join(names)} hold NaN or infinite values; "
                       "find where they were made (the noise, the text encoder, the "
                       "scheduler) and pass finite ones")


def _finite_or_excluded(mask: torch.Tensor) -> torch.Tensor:
    """Where an attention mask's values are finite or -inf (an additive bias's exclusion)."""
    return torch.isfinite(mask) | (mask == float("-inf"))


def check_plain_call(inputs: dict) -> None:
    """Refuse a U-Net call made under ``torch.autocast`` or with an input that requires grad.

    The engine's graphs compute in the U-Net's own dtype and do not follow autocast (a
    recording under it would hold values of another precision than its edits compute), and
    they run without autograd (the output would carry no gradient, and gradient guidance
    would fail later with torch's own error). The engine's entry points and the backend's
    recording and editing check it first."""
    tensors = [(name, leaf) for name, value in inputs.items() for leaf in _leaves(value)
               if isinstance(leaf, torch.Tensor)]
    for device_type in sorted({tensor.device.type for _, tensor in tensors}):
        if _autocast_on(device_type):
            raise FiseditError(
                f"torch.autocast is on for {device_type}, but the engine's graphs compute in "
                "the U-Net's own dtype and do not follow it (a recording and its edits would "
                "mix precisions); convert the U-Net and its inputs instead (unet.half(), "
                "pipe.to(torch.float16)) and call outside torch.autocast")
    grad = sorted({name for name, tensor in tensors if tensor.requires_grad})
    if grad:
        raise FiseditError(
            f"U-Net input(s) {', '.join(grad)} require grad, but the engine computes without "
            "autograd, so its output would carry no gradient; detach them (or run under "
            "torch.no_grad()), or take gradients through the plain U-Net, outside "
            "fc.recording / fc.editing")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:        # a device type autocast has no mode for (meta)
        return False


def _leaves(value) -> list:
    """The values inside nested dicts and lists (ControlNet residuals, IP-Adapter embeds)."""
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def node_macs(program: Program, plan: MaskPlan, config: SparseConfig) -> list[dict]:
    """Per canonical node: dense, sparse and ideal MACs under ``plan``, and how it runs.

    Sparse MACs count what the sparse ops really compute (each op's ``OpSpec.edit_macs``): whole
    output tiles for windowed convolutions, active positions for per-position ops, active
    queries (times active keys under the ``sparse`` self-attention policy) for attention. Ideal
    MACs scale positional work by the raw mask fraction.
    """
    rows = []
    for node in program.canonical.graph.nodes:
        dense = node.meta.get(ir.META_MACS, 0)
        domain = node.meta.get(ir.META_DOMAIN)
        mode = program.modes.get(node.name, "")
        sparse = ideal = dense
        positional = domain is not None and domain.positional and mode == "sparse"
        if positional and plan[domain.level].dense:
            mode = "dense"      # rewritten sparsely, but this plan runs its level dense
        if dense and positional:
            level = plan[domain.level]
            ideal = dense * plan.raw_fraction
            sparse = dense if level.dense else registry.edit_macs(node, level, config, dense)
        rows.append({"name": node.name, "op": ir.op_name(node) or node.op, "mode": mode,
                     "dense_macs": int(dense), "sparse_macs": int(math.ceil(sparse)),
                     "ideal_macs": int(math.ceil(ideal))})
    return rows
