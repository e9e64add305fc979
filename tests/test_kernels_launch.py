"""kernels.launch_options and set_programmatic_launch: when the kernels launch as programmatic
dependents, and that doing so changes no result (on a GPU that supports it)."""

import pytest
import torch

from fisedit_compiler.execution import kernels

pytest.importorskip("triton")


@pytest.fixture
def restore_setting():
    previous = kernels.set_programmatic_launch(True)
    yield
    kernels.set_programmatic_launch(previous)


def test_setting_returns_the_previous_one_and_refuses_non_bools(restore_setting):
    assert kernels.set_programmatic_launch(False) is True
    assert kernels.set_programmatic_launch(True) is False
    with pytest.raises(TypeError, match="True or False"):
        kernels.set_programmatic_launch(1)
    assert kernels.set_programmatic_launch(True) is True  # the refused call changed nothing


def test_no_programmatic_launch_off_the_gpu(restore_setting):
    # The CPU tests run the kernels in Triton's interpreter, which has no grid dependencies.
    assert kernels.launch_options(torch.zeros(1)) == {"PDL": False, "launch_pdl": False}


@pytest.mark.gpu
def test_programmatic_launch_changes_no_result_in_a_cuda_graph(restore_setting):
    from fisedit_compiler.execution.kernels.tokens import add_layer_norm

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(516, 320, generator=gen).to("cuda", torch.float16)
    weight = torch.rand(320, generator=gen).to("cuda", torch.float16)
    bias = torch.randn(320, generator=gen).to("cuda", torch.float16)

    def chain():
        value = x
        for _ in range(50):           # each kernel reads the one before it
            _, value = add_layer_norm(value, x, weight, bias, 1e-5)
        return value

    outputs = {}
    for overlap in (False, True):
        kernels.set_programmatic_launch(overlap)
        expected = chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        outputs[overlap] = out.clone()
    assert torch.equal(outputs[False], outputs[True])
    supported = torch.cuda.get_device_capability()[0] >= 9 and kernels.HAS_GRID_DEPENDENCY_CONTROL
    assert kernels.launch_options(x)["launch_pdl"] is supported
