"""DerivedWeights: a program's weight copies (packed conv weights, grouped projections) are
built once, follow in-place changes of their sources and go with them. WeightFingerprint reads
the weights' values as content_fingerprint does, bit for bit, wherever they are."""

import pytest
import torch

from fisedit_compiler.execution import derived_weights
from fisedit_compiler.execution.derived_weights import (DerivedWeights, WeightFingerprint,
                                                        content_fingerprint)
from fisedit_compiler.execution.kernels.sparse_conv import pack_weight


def join(*tensors):
    return torch.cat(tensors)


def test_a_copy_is_built_once_and_follows_in_place_changes():
    derived = DerivedWeights()
    weight = torch.randn(4, 3, 3, 3)
    first = derived.get((weight,), pack_weight)
    assert torch.equal(first, pack_weight(weight)) and derived.get((weight,), pack_weight) is first
    weight.mul_(2)                      # an in-place change moves the version counter
    again = derived.get((weight,), pack_weight)
    assert again is first and torch.equal(again, pack_weight(weight))
    with torch.no_grad():
        weight.copy_(torch.randn(4, 3, 3, 3))
    derived.refresh()                   # what a captured CUDA graph needs before replay
    assert torch.equal(first, pack_weight(weight))
    del weight
    assert len(derived) == 0            # dropped with its source


def test_a_copy_of_several_sources_follows_each_and_builds_are_told_apart():
    derived = DerivedWeights()
    q, k = torch.randn(3, 5), torch.randn(2, 5)
    joined = derived.get((q, k), join)
    assert torch.equal(joined, torch.cat([q, k])) and joined.shape == (5, 5)
    assert derived.get((q,), pack_weight_2d) is not joined     # another build, another entry
    k.add_(1.0)
    assert derived.get((q, k), join) is joined and torch.equal(joined, torch.cat([q, k]))
    assert derived.nbytes() == (25 + 15) * 4
    del k
    assert len(derived) == 1            # the (q, k) entry went with k; q's own entry stays


def pack_weight_2d(weight):
    return weight.t().contiguous()


def test_versions_move_with_in_place_changes_and_inference_tensors_have_none():
    from fisedit_compiler.execution.derived_weights import tensor_versions, version_counters

    a, b = torch.zeros(2), torch.zeros(3)
    before = version_counters([a, b])
    b.add_(1)
    after = version_counters([a, b])
    assert after[0] == before[0] and after[1] != before[1]
    assert tensor_versions([a, b])[0] == after
    with torch.inference_mode():
        frozen = torch.zeros(2)
    assert version_counters([a, frozen]) == (after[0], None)


def test_a_data_assignment_moves_the_storage_not_the_counter():
    """``param.data = ...`` (PEFT's merge, ``.half().float()``) leaves the version counter as
    it was: the storage address is what tells the change."""
    from fisedit_compiler.execution.derived_weights import tensor_versions

    weight = torch.nn.Parameter(torch.randn(4, 3))
    counters, storages = tensor_versions([weight])
    weight.data = weight.data * 2
    now = tensor_versions([weight])
    assert now[0] == counters and now[1] != storages


def test_a_copy_follows_a_data_assignment_of_its_source():
    derived = DerivedWeights()
    weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    first = derived.get((weight,), pack_weight)
    weight.data = weight.data * 3           # no version bump: the storage moved
    again = derived.get((weight,), pack_weight)
    assert again is first and torch.equal(again, pack_weight(weight))


def test_a_copy_made_under_inference_mode_is_refreshed_outside_it():
    """An edit under torch.inference_mode makes the copies inference tensors; the weights
    changed in place afterwards (a LoRA fused), a refresh outside it still writes them."""
    derived = DerivedWeights()
    weight = torch.randn(4, 3, 3, 3)
    with torch.inference_mode():
        first = derived.get((weight,), pack_weight)
    with torch.no_grad():
        weight.mul_(2)
    derived.refresh()
    assert torch.equal(first, pack_weight(weight))
    assert derived.get((weight,), pack_weight) is first


def _weights(device) -> list[torch.Tensor]:
    """Weights of every kind a U-Net holds: fp16 and fp32 parameters, an fp64 one, an integer
    buffer (position ids), one that is a view into a larger tensor."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(64, 32, generator=gen)
    return [t.to(device) for t in (torch.randn(320, 4, 3, 3, generator=gen).half(),
                                   torch.randn(320, generator=gen), torch.randn(7, generator=gen,
                                   dtype=torch.float64), torch.arange(77), whole)] + \
        [whole.to(device)[8:40]]


def _reads_as_content_fingerprint(device) -> None:
    weights = _weights(device)
    fingerprint = WeightFingerprint(weights)
    first = fingerprint()
    assert first == content_fingerprint(weights) and len(first) == len(weights)
    assert fingerprint() == fingerprint() == first          # the later reads (a graph on a GPU)
    weights[0].data.mul_(1.5)                                # no version counter moves
    changed = fingerprint()
    assert changed != first and changed == content_fingerprint(weights)
    assert changed[1:] == first[1:]
    weights[1].data = weights[1].data * 2                    # a new storage: read where it is
    assert fingerprint() == content_fingerprint(weights) != changed
    weights[2].data[0] = float("nan")                         # NaN compares equal to itself
    assert fingerprint() == fingerprint() == content_fingerprint(weights)


def test_the_weight_fingerprint_is_content_fingerprint_on_the_cpu():
    _reads_as_content_fingerprint("cpu")
    assert WeightFingerprint([])() == content_fingerprint([]) == ()


def test_preparing_a_weight_fingerprint_on_the_cpu_reads_nothing(monkeypatch):
    """Reads run eagerly off CUDA: there is no graph to capture, so prepare costs no read."""
    weights = _weights("cpu")
    fingerprint = WeightFingerprint(weights)
    reads = []
    eager = derived_weights.content_fingerprint
    monkeypatch.setattr(derived_weights, "content_fingerprint",
                        lambda tensors: reads.append(1) or eager(tensors))
    fingerprint.prepare()
    assert reads == [] and fingerprint._graph is None
    assert fingerprint() == eager(weights) and reads == [1]


@pytest.mark.gpu
def test_a_prepared_weight_fingerprint_replays_at_its_next_read(monkeypatch):
    """prepare pays the eager read and the capture, for new tensors and after a move, so that
    the next read replays the graph: no eager read, the same bits."""
    weights = _weights("cuda")
    eager = derived_weights.content_fingerprint
    for read_before in (False, True):
        fingerprint = WeightFingerprint(weights)
        if read_before:
            fingerprint()
        reads = []
        with monkeypatch.context() as patch:
            patch.setattr(derived_weights, "content_fingerprint",
                          lambda tensors: reads.append(1) or eager(tensors))
            fingerprint.prepare()
        # The capture checks its replay with one eager read; a first read adds one.
        assert len(reads) == (1 if read_before else 2)
        graph = fingerprint._graph
        assert graph is not None
        expected = eager(weights)
        with monkeypatch.context() as patch:
            patch.setattr(derived_weights, "content_fingerprint", None)   # no eager read
            assert fingerprint() == expected
            fingerprint.prepare()                                # prepared already: no read
        assert fingerprint._graph is graph
    weights[1].data = weights[1].data.clone()                    # moved: prepared anew
    fingerprint.prepare()
    assert fingerprint._graph is not graph and fingerprint() == eager(weights)


@pytest.mark.gpu
def test_the_weight_fingerprint_replays_content_fingerprint_on_a_gpu():
    _reads_as_content_fingerprint("cuda")
    weights = _weights("cuda")
    fingerprint = WeightFingerprint(weights)
    fingerprint()
    fingerprint()
    assert fingerprint._graph is not None                    # the second read captured it
    replayed = fingerprint._graph[0]
    weights[3].data = weights[3].data.clone()                # moved: captured again
    assert fingerprint() == content_fingerprint(weights)
    assert fingerprint() == content_fingerprint(weights)
    assert fingerprint._graph[0] is not replayed


@pytest.mark.gpu
@pytest.mark.parametrize("failure", ["capture", "other values"])
def test_a_weight_fingerprint_whose_capture_fails_reads_eagerly(monkeypatch, failure):
    """A capture that raises, or whose replay reads other values than the eager read (which
    would refuse every later edit), warns once and leaves every later read eager."""
    weights = _weights("cuda")
    fingerprint = WeightFingerprint(weights)
    fingerprint()
    if failure == "capture":
        def no_capture(*args, **kwargs):
            raise RuntimeError("no capture here")

        monkeypatch.setattr(torch.cuda, "graph", no_capture)
        message = "no capture here.*runs eagerly"
    else:
        eager = derived_weights.content_fingerprint
        monkeypatch.setattr(derived_weights, "content_fingerprint",
                            lambda tensors: eager(tensors)[::-1])
        message = "read other values.*runs eagerly"
    with pytest.warns(RuntimeWarning, match=message):
        assert fingerprint() == derived_weights.content_fingerprint(weights)
    assert fingerprint._graph is None
    assert fingerprint() == derived_weights.content_fingerprint(weights)
