"""PassValues: a program's pass constants, computed once per edit pass.

Why: ``passes.hoist_pass_constants`` moves what an edit step computes from the inputs a pass
holds fixed (the text's K/V projections, ...) into a graph of its own; something must run that
graph when, and only when, its values would change. Every pass's first step computes them (a
new pass is where a new prompt or new weights come in, by whatever means they were written).
A pipeline's loop passes the same tensors (its prompt embeddings, added conditions) at every
step of a pass, so for the pass's later steps the values are kept with those tensors (held
here, so that no other tensor can take their place at their addresses), their version
counters and data addresses (an in-place write moves a counter; a ``.data`` assignment moves
an address), and the engine's token for its weights (a new token whenever the weights changed
in place); any difference computes them again, as for a pipeline whose step-end callback
switches the prompt mid-pass. An inference tensor, which has no version counter, cannot be
told unchanged: its values are computed at every step, as they were before the pass moved
them.

Within a pass, writes that move no counter and no address are not seen: through
``tensor.data`` (``.data.mul_``), a NumPy or DLPack view, another tensor ``set_`` to the same
storage, a CUDA graph replayed into the text states' buffer. A pipeline that changes its text
states mid-pass does so with new tensors or tracked in-place ops; with
``hoist_pass_constants=False`` the constants are computed inside every step, which sees any
write.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..execution.derived_weights import storage_addresses, version_counters


class PassValues:
    """The values of one program's pass constants graph for the inputs of the current pass."""

    def __init__(self, constants: fx.GraphModule):
        self.constants = constants
        self.names = tuple(node.name for node in constants.graph.nodes
                           if node.op == "placeholder")
        # (inputs, their version counters, their addresses, weights token, values) of the last
        # computation: one tuple, replaced whole.
        self._kept: tuple | None = None
        self.computed = 0          # how many times the values were computed

    def __call__(self, flat: dict, weights_token, new_pass: bool) -> tuple:
        """The values for the fixed inputs in ``flat`` (by name) under the weights that
        ``weights_token`` stands for, computed afresh at a ``new_pass``'s first step; on its
        later steps the kept tuple itself while nothing changed, so that a caller can tell by
        identity that they are the ones it loaded before."""
        inputs = tuple(flat[name] for name in self.names)
        kept = self._kept
        if not new_pass and kept is not None and _unchanged(kept, inputs, weights_token):
            return kept[-1]
        values = tuple(self.constants(**dict(zip(self.names, inputs))))
        self.computed += 1
        if any(isinstance(value, torch.Tensor) and value.is_inference() for value in inputs):
            self._kept = None
        else:
            self._kept = (inputs, version_counters(inputs), storage_addresses(inputs),
                          weights_token, values)
        return values


def _unchanged(kept: tuple, inputs: tuple, weights_token) -> bool:
    held, versions, addresses, token, _ = kept
    return (token is weights_token and len(held) == len(inputs)
            and all(a is b for a, b in zip(held, inputs))
            and version_counters(inputs) == versions and storage_addresses(inputs) == addresses)
