"""ModuleState: what a U-Net's captured graphs depend on besides its weights' values.

A captured graph is the U-Net's forward as it ran once: it holds the parameter and buffer
objects it read (so in-place writes to them stay visible, and are checked per recording by
their version counters) but bakes in everything else: which submodules and attention
processors ran, each module's settings (FreeU's factors, an IP-Adapter's scale, PEFT's active
and merged adapters, forward chunking) and the hooks. Changing any of those after
``fc.compile`` (``unet.enable_freeu``, ``set_attn_processor``, ``set_adapters``, a LoRA
injected, ``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``) leaves the
graph describing a U-Net that no longer exists; so does swapping a weight's storage
(``param.data = ...``, PEFT's merge, ``.half().float()``, ``.to()``), since a CUDA graph
captured from it reads the old addresses. The engine takes this fingerprint when it is
compiled and refuses, naming the change, any call that finds it different.

The fingerprint, per module (``named_modules``) and per attention processor that is not a
module (diffusers keeps it as the module's ``processor`` attribute): its class; the names in
its ``__dict__`` (an attribute added, as ``enable_freeu`` adds ``s1``, or removed) and the value
of each, compared by value where it is a plain value (bool, int, float, str, None, bytes, and
tuples of them), by a copy of its contents where it is a list, dict or set (PEFT's
``merged_adapters`` and ``scaling``, an IP-Adapter's ``scale`` list, which are changed in
place), and by identity otherwise (a processor, a config, a function); the identity of each
parameter, buffer and submodule; the number of forward hooks and pre-hooks; and the storage
address of each weight. nn.Module's own bookkeeping (the parameter, buffer and submodule dicts,
read entry by entry above, and the other hook tables, which inference does not run) is not
compared as an attribute. Private attributes are compared like public ones: PEFT keeps its
flags there (``_disable_adapters``, ``_active_adapter``), and diffusers its chunking. An
attribute added with the value None is no change (diffusers reads optional settings as
``getattr(module, name, None)``; ``disable_freeu`` leaves FreeU's factors as None): it is
tracked from then on, so that giving it a value is one.

Cost (full-size SD1.5, ~740 objects, ~4,800 plain attributes, ~690 weights): reading everything
takes ~0.35 ms of host time (``changes``), so the engine does it on each record and at the
first step of each edit pass, and on the other steps compares only the identity of every
parameter and buffer (``same_tensors``, ~0.03 ms) next to their version counters. The reads are
``map`` over precomputed (container, key) pairs, which run in C; building the fingerprint
takes ~20 ms.
"""

from __future__ import annotations

import operator
from itertools import chain

import torch

from ..checks import some_names
from ..execution.derived_weights import WeightFingerprint, storage_addresses

# nn.Module's own bookkeeping in every module's __dict__: the parameter, buffer and submodule
# dicts (compared entry by entry instead), the hook tables (the forward ones are counted, the
# rest do not run in inference) and their flags. ``training`` is a setting, compared as one.
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) - {"training"}
# Marks torch.compile leaves on the module it compiles (the dynamo frontend's capture included:
# ``_is_torch_compile``; ``module.compile()``: ``_compiled_call_impl``): how the module is
# called, not what its forward computes.
_COMPILE_MARKS = frozenset({"_is_torch_compile", "_compiled_call_impl"})
# Values compared by value: immutable, and cheap to compare.
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
# Containers changed in place (PEFT's ``merged_adapters.append``): compared by a copy.
_MUTABLE = (list, dict, set)
_SHOWN = 3      # changes named in a message; the rest are counted


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (
        type(value) is tuple and all(_plain(item) for item in value))


def _frozen(value):
    """An immutable copy of a list, dict or set (recursively), to compare its contents later
    even when the container itself is changed in place; anything else as it is."""
    kind = type(value)
    if kind is list or kind is tuple:
        return tuple(map(_frozen, value))
    if kind is dict:
        return tuple((key, _frozen(item)) for key, item in value.items())
    if kind is set:
        return frozenset(value)
    return value


class _Slots:
    """(container, key) pairs whose values are read in one ``map``, with what each is for
    messages: the owner's path and the kind of entry."""

    def __init__(self):
        self.containers: list = []
        self.keys: list = []
        self.labels: list = []       # (path, kind) per pair

    def add(self, container, key, path: str, kind: str) -> None:
        self.containers.append(container)
        self.keys.append(key)
        self.labels.append((path, kind))

    def read(self) -> tuple:
        return tuple(map(operator.getitem, self.containers, self.keys))


class ModuleState:
    """The fingerprint of a U-Net's module state, taken now (module docstring)."""

    def __init__(self, unet: torch.nn.Module):
        self.plain, self.mutable, self.same = _Slots(), _Slots(), _Slots()
        self.tensors = _Slots()         # every parameter and buffer entry, compared by identity
        self.sized: list = []           # containers whose size is compared, and their labels
        self.objects: list = []         # tracked objects (modules, processors)
        self.paths: list[str] = []
        for path, module in unet.named_modules():
            self._track(path, module)
            for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
                for key in table:
                    self.tensors.add(table, key, path, kind)
            self._sized(module._modules, path, "submodule")
            for key in module._modules:
                self.same.add(module._modules, key, path, "submodule")
            self._sized(module._forward_hooks, path, "forward hook")
            self._sized(module._forward_pre_hooks, path, "forward pre-hook")
            processor = module.__dict__.get("processor")
            if processor is not None and not isinstance(processor, torch.nn.Module) and \
                    hasattr(processor, "__dict__"):
                self._track(_join(path, "processor"), processor)
        # Hooks registered for every module (register_module_forward_hook) run in every
        # forward, and export captures them.
        hooks = torch.nn.modules.module
        self._sized(hooks._global_forward_hooks, "", "global forward hook")
        self._sized(hooks._global_forward_pre_hooks, "", "global forward pre-hook")
        self.types = tuple(map(type, self.objects))
        self.sized_containers = [container for container, _, _, _ in self.sized]
        self.sizes = tuple(map(len, self.sized_containers))
        self.plain_values = self.plain.read()
        self.mutable_values = tuple(map(_frozen, self.mutable.read()))
        self.same_values = self.same.read()
        # The weights, unique (shared ones once), with names for messages; the tensor entries
        # hold them by identity, and holding them keeps their ids from being reused.
        named = dict(chain(unet.named_parameters(), unet.named_buffers()))
        self.weights = list(named.values())
        self.weight_names = list(named)
        self.storages = storage_addresses(self.weights)
        self.tensor_values = self.tensors.read()
        # Their values' fingerprint, read by every engine that shares this state (with_config):
        # on a GPU a CUDA graph of the read, captured once for all of them.
        self.fingerprint = WeightFingerprint(self.weights)

    def _track(self, path: str, obj) -> None:
        """Its class, its attribute names (through the size of its __dict__) and values."""
        self.objects.append(obj)
        self.paths.append(path)
        attributes = obj.__dict__
        self._sized(attributes, path, "attribute")
        module = isinstance(obj, torch.nn.Module)
        for key, value in attributes.items():
            if (module and key in _MODULE_INTERNALS) or key in _COMPILE_MARKS:
                continue
            if _plain(value):
                self.plain.add(attributes, key, path, "attribute")
            elif type(value) in _MUTABLE:
                self.mutable.add(attributes, key, path, "attribute")
            else:
                self.same.add(attributes, key, path, "attribute")

    def _sized(self, container, path: str, kind: str) -> None:
        self.sized.append((container, path, kind, frozenset(container)))

    # -- checks ---------------------------------------------------------------------------
    def same_tensors(self) -> bool:
        """Whether every parameter and buffer is still the object it was (the per-step check).
        A parameter replaced, not changed in place, is no longer the one the graphs read."""
        try:
            return all(map(operator.is_, self.tensors.read(), self.tensor_values))
        except KeyError:            # an entry removed
            return False

    def same_storages(self) -> bool:
        """Whether every weight's data is still at its address (the per-step check of a
        ``.data`` assignment, which PEFT's merge makes: no identity or version counter
        moves)."""
        return storage_addresses(self.weights) == self.storages

    def changes(self, storages: tuple | None = None) -> list[str]:
        """What changed since the fingerprint was taken, in words (empty if nothing did).
        ``storages``: the weights' current ``storage_addresses`` if the caller has read them."""
        if storages is None:
            storages = storage_addresses(self.weights)
        if self._unchanged(storages):
            return []
        changes = self._describe(storages)
        if not changes:
            # Only torch.compile's marks came or went (``_COMPILE_MARKS``), or attributes
            # were added as None (``_added_as_none``): track those from now on, as plain
            # values (so that setting one later is a change), and take the attribute counts
            # as they are now, so that the fast comparison passes again.
            for container, key, path in self._added_as_none():
                self.plain.add(container, key, path, "attribute")
                self.plain_values += (None,)
            self.sized = [(container, path, kind, frozenset(container))
                          for container, path, kind, _ in self.sized]
            self.sizes = tuple(map(len, self.sized_containers))
        return changes

    def _added_as_none(self) -> list[tuple]:
        """``(attributes, name, path)`` of each attribute added since the fingerprint with the
        value None. Not a change: diffusers reads its optional settings as ``getattr(module,
        name, None)``, so None is what an absent one reads as; ``disable_freeu`` sets FreeU's
        factors to None rather than deleting them, and a U-Net compiled before
        ``enable_freeu`` must take that as undone."""
        return [(container, name, path)
                for container, path, kind, keys in self.sized if kind == "attribute"
                for name in sorted(set(container) - keys - _COMPILE_MARKS)
                if container[name] is None]

    def _unchanged(self, storages: tuple) -> bool:
        """The fast comparison: every read in C, the plain values as one tuple."""
        try:
            return (storages == self.storages
                    and all(map(operator.is_, map(type, self.objects), self.types))
                    and tuple(map(len, self.sized_containers)) == self.sizes
                    and self.plain.read() == self.plain_values
                    and all(map(operator.is_, self.same.read(), self.same_values))
                    and self.same_tensors()
                    and tuple(map(_frozen, self.mutable.read())) == self.mutable_values)
        except Exception:  # noqa: BLE001 - a key removed, or a value whose == is no bool
            return False   # (an attribute that now holds a tensor): it changed

    def _describe(self, storages: tuple) -> list[str]:
        """Every difference, in words (the slow path, once something differs); weights, often
        changed many at once, in one entry per kind of change."""
        changes = []
        moved = [name for name, old, new in zip(self.weight_names, self.storages, storages)
                 if old != new]
        if moved:
            changes.append(f"the storage of weight(s) {some_names(moved, _SHOWN)} was replaced "
                           "(a .data assignment: PEFT's merge or fuse_lora, .half(), .to(); "
                           "a .to() back to the old dtype or device makes new storage again "
                           "and does not undo it, putting the old tensors back does)")
        replaced = [_join(path, key) for container, key, (path, _), old in zip(
            self.tensors.containers, self.tensors.keys, self.tensors.labels, self.tensor_values)
            if key in container and container[key] is not old]
        if replaced:
            changes.append(f"parameter(s) or buffer(s) {some_names(replaced, _SHOWN)} replaced "
                           "by other tensors (module.weight = nn.Parameter(...), "
                           "load_state_dict(assign=True))")
        for path, obj, old in zip(self.paths, self.objects, self.types):
            if type(obj) is not old:
                changes.append(f"{path or 'the U-Net'} is now a {_type_name(type(obj), old)} "
                               f"(was {_type_name(old, type(obj))})")
        for container, path, kind, keys in self.sized:
            if "hook" in kind:
                if len(container) != len(keys):
                    where = "" if kind.startswith("global") else f" on {path or 'the U-Net'}"
                    changes.append(f"{kind}s{where}: {len(keys)} -> {len(container)}")
                continue
            added = {name for name in set(container) - keys - _COMPILE_MARKS
                     if kind != "attribute" or container[name] is not None}
            for verb, names in (("added to", added),
                                ("removed from", keys - set(container) - _COMPILE_MARKS)):
                if names:
                    changes.append(f"{kind}(s) {', '.join(sorted(map(str, names)))} {verb} "
                                   f"{path or 'the U-Net'}")
        for slots, old_values, same in ((self.plain, self.plain_values, False),
                                        (self.mutable, self.mutable_values, False),
                                        (self.same, self.same_values, True)):
            for container, key, (path, kind), old in zip(slots.containers, slots.keys,
                                                         slots.labels, old_values):
                if key not in container:
                    continue        # told above, as removed
                new = container[key]
                if same:
                    if new is not old and type(new) is type(old):
                        # diffusers' undo calls (disable_attention_slicing,
                        # unfuse_qkv_projections) install new objects of the old class.
                        changes.append(f"{kind} {_join(path, key)} was replaced by another "
                                       f"{_type_name(type(new), type(old))} object (only the "
                                       "very object it had undoes that)")
                    elif new is not old:
                        changes.append(f"{kind} {_join(path, key)} was replaced: "
                                       f"{_type_name(type(old), type(new))} -> "
                                       f"{_type_name(type(new), type(old))}")
                    continue
                new = _frozen(new)
                try:
                    differs = bool(new != old)
                except Exception:  # noqa: BLE001 - a value whose != is no bool
                    differs = True
                if differs:
                    changes.append(f"{kind} {_join(path, key)} changed from {_short(old)} to "
                                   f"{_short(new)}")
        return changes

    @staticmethod
    def describe(changes: list[str]) -> str:
        """``changes`` for a message: the first few, and how many more."""
        shown = "; ".join(changes[:_SHOWN])
        more = len(changes) - _SHOWN
        return shown + (f"; and {more} more change(s)" if more > 0 else "")


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(kind: type, other: type) -> str:
    """A class's name, qualified by its module where ``other`` has the same name (PEFT's
    LoRA layer is a ``Linear`` too)."""
    if kind.__name__ == other.__name__ and kind is not other:
        return f"{kind.__module__}.{kind.__qualname__}"
    return kind.__name__


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
