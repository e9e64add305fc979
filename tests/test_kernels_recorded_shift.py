"""kernels.recorded_shift: kernels given a stand-in for the recorded values and a byte shift
read the values at the shifted address, never the stand-in's.

Each case puts a stand-in (random values of the recorded tensor's shape and strides) and the
true recorded values in one buffer, the true ones a multiple of 512 bytes later, as a CUDA
graph's static store and a recorded step of one layout lie in memory. On CPU the kernels run
in Triton's interpreter.
"""

import pytest
import torch

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution.kernels import HAS_TRITON
from fisedit_compiler.execution.kernels.attention import attention, attention_reference
from fisedit_compiler.execution.kernels.recorded_shift import read_shifted
from fisedit_compiler.execution.kernels.sparse_conv import sparse_conv2d, sparse_conv2d_reference

from test_kernels_attention import assert_close, edit, rand
from test_kernels_sparse_conv import GEOMETRIES, METHODS, assert_matches, make_case

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def stand_in(*tensors):
    """Copies of ``tensors`` (same shapes, strides and dtype) in one new buffer, each at its
    own 512-byte aligned place, then stand-ins for them (random values) in the same buffer
    after them: returns (stand-ins, the copies, the shift from a stand-in to its copy)."""
    spans = [-(-t.numel() * t.element_size() // 512) * 512 for t in tensors]
    half = sum(spans)
    buffer = torch.empty(2 * half, dtype=torch.uint8, device=DEVICE)
    copies, stand_ins, offset = [], [], 0
    for tensor, span in zip(tensors, spans):
        for target, start in ((copies, offset), (stand_ins, half + offset)):
            flat = buffer[start:start + tensor.numel() * tensor.element_size()].view(tensor.dtype)
            target.append(flat.as_strided(tensor.shape, tensor.stride()))
        copies[-1].copy_(tensor)
        stand_ins[-1].copy_(torch.randn(tensor.shape).to(tensor.dtype))
        offset += span
    shift = torch.tensor([-half], dtype=torch.int64, device=DEVICE)
    return stand_ins, copies, shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_read_shifted_copies_the_values_at_the_shifted_address(dtype, layout):
    recorded = torch.randn(2, 5, 6, 7, device=DEVICE).to(dtype)
    if layout == "channels_last":
        recorded = recorded.contiguous(memory_format=torch.channels_last)
    (fake,), (true,), shift = stand_in(recorded)
    result = read_shifted(fake, shift)
    assert result.stride() == recorded.stride() and torch.equal(result, recorded)
    assert read_shifted(true, None) is true


def test_read_shifted_refuses_bad_shifts_and_gapped_tensors():
    recorded = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(FiseditError, match="one-element int64 tensor"):
        read_shifted(recorded, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(FiseditError, match="one-element int64 tensor"):
        read_shifted(recorded, 64)
    with pytest.raises(FiseditError, match="fill its span"):
        read_shifted(recorded[:, ::2], torch.zeros(1, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["3x3", "3x3-stride2"])
def test_conv_reads_its_recorded_input_at_the_shift(name, method):
    args, kwargs, _ = make_case(GEOMETRIES[name], seed=5)
    expected = sparse_conv2d_reference(*args, **kwargs)
    (fake,), _, shift = stand_in(args[1].contiguous(memory_format=torch.channels_last))
    args[1] = fake
    assert_matches(sparse_conv2d(*args, **kwargs, method=method, recorded_shift=shift),
                   expected)


def test_attention_reads_its_recorded_kv_at_the_shift():
    e = edit(2, 3, 50, 17, 40, torch.float16, strided=True)
    q = rand(2, 3, 17, 40, torch.float16, strided=True)
    expected = attention_reference(q, e["k"], e["v"], 0.3, e["k_recorded"], e["v_recorded"],
                                   e["key_position"])
    (fake_k, fake_v), _, shift = stand_in(e["k_recorded"], e["v_recorded"])
    assert_close(attention(q, e["k"], e["v"], 0.3, fake_k, fake_v, e["key_position"],
                           recorded_shift=shift), expected)
    with pytest.raises(FiseditError, match="pass it with k_recorded"):
        attention(q, e["k"], e["v"], 0.3, recorded_shift=shift)
