"""The shared argument checks: every form of a bad value is a FiseditError, every good one
comes back as the plain Python value (hypothesis draws the forms)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fisedit_compiler.checks import (check_choice, check_float, check_guidance_scale, check_int,
                                     check_prompt, guides)
from fisedit_compiler.config import SparseConfig
from fisedit_compiler.errors import FiseditError

# Values that are no int: floats (even whole ones), strings, bools, containers, None, float or
# multi-element tensors.
NOT_INTS = st.one_of(
    st.floats(allow_nan=True), st.text(max_size=4), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2), st.just(torch.tensor([1, 2])), st.just(torch.tensor([1])),
    st.just(torch.tensor(1.0)), st.just(np.float64(2.0)), st.just(torch.tensor(True)))


@given(st.integers(-10**6, 10**6), st.sampled_from(["int", "numpy", "tensor"]))
def test_check_int_takes_integers_of_any_library(value, form):
    wrapped = {"int": value, "numpy": np.int64(value), "tensor": torch.tensor(value)}[form]
    result = check_int("step", wrapped)
    assert result == value and type(result) is int


@given(NOT_INTS)
def test_check_int_refuses_everything_else(value):
    with pytest.raises(FiseditError, match="step must be an int"):
        check_int("step", value)


@given(st.integers(-100, 100))
def test_check_int_names_the_range(value):
    if 0 <= value <= 9:
        assert check_int("step", value, minimum=0, maximum=9) == value
    else:
        with pytest.raises(FiseditError, match=r"out of range: it must satisfy 0 <= step <= 9"):
            check_int("step", value, minimum=0, maximum=9)


@given(st.one_of(st.floats(), st.integers(-10**6, 10**6)))
def test_check_float_refuses_nan_and_infinity(value):
    if math.isfinite(value):
        assert check_float("guidance_scale", value) == float(value)
    else:
        with pytest.raises(FiseditError, match="finite"):
            check_float("guidance_scale", value)


@given(st.one_of(st.text(max_size=4), st.booleans(), st.none(), st.lists(st.floats())))
def test_check_float_refuses_non_numbers(value):
    with pytest.raises(FiseditError, match="must be a number"):
        check_float("guidance_scale", value)


def test_check_choice_and_prompt():
    check_choice("mode", "a", ("a", "b"))
    with pytest.raises(FiseditError, match="mode must be one of 'a', 'b', got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(FiseditError, match="mode must be one of"):
        check_choice("mode", ["a"], ("a", "b"))      # unhashable: still a clear error
    check_prompt("prompt", "a cat")
    check_prompt("negative_prompt", None, optional=True)
    with pytest.raises(FiseditError, match="one EditSession per prompt"):
        check_prompt("prompt", ["a cat", "a dog"])
    with pytest.raises(FiseditError, match="prompt must be one str"):
        check_prompt("prompt", None)


# -- SparseConfig: every field, many forms ---------------------------------------------------

@given(st.one_of(st.floats(), st.text(max_size=3), st.booleans(), st.none(),
                 st.integers(max_value=-1)))
def test_sparse_config_dilation_must_be_a_non_negative_int(value):
    with pytest.raises(FiseditError, match="SparseConfig.dilation"):
        SparseConfig(dilation=value)


@given(st.one_of(st.floats(), st.text(max_size=3), st.booleans(), st.none(),
                 st.integers(max_value=0), st.just(()), st.just([]),
                 st.lists(st.integers(max_value=0), min_size=1, max_size=3)))
def test_sparse_config_tile_must_be_positive_ints(value):
    with pytest.raises(FiseditError, match="SparseConfig.tile"):
        SparseConfig(tile=value)


@given(st.lists(st.integers(1, 8), min_size=1, max_size=4))
def test_sparse_config_takes_a_tile_list_as_a_tuple(tiles):
    config = SparseConfig(tile=tiles)
    assert config.tile == tuple(tiles)
    hash(config)      # engines key their programs by the config


def test_equal_configs_hash_alike_whatever_number_type_they_were_given():
    import numpy as np

    configs = [SparseConfig(bucket_ratio=ratio, dense_threshold=threshold, tile=tile)
               for ratio, threshold, tile in ((1.5, 0.5, 4), (torch.tensor(1.5), np.float32(0.5),
                                              np.int64(4)), (np.float64(1.5), 0.5, [4][0]))]
    assert len(set(configs)) == 1
    assert all(type(config.bucket_ratio) is float for config in configs)


@given(st.one_of(st.floats().filter(lambda v: not 0 <= v <= 1), st.text(max_size=3),
                 st.none(), st.just(()),
                 st.lists(st.floats(1.01, 5), min_size=1, max_size=3)))
def test_sparse_config_dense_threshold_must_be_fractions(value):
    with pytest.raises(FiseditError, match="SparseConfig.dense_threshold"):
        SparseConfig(dense_threshold=value)


@pytest.mark.parametrize("field, value", [
    ("group_norm", "exact"), ("self_attention", None), ("frontend", "fx"),
    ("kernels", "cuda"), ("check_inputs", "yes"), ("cuda_graphs", 1), ("group_projections", "on"),
    ("conv_method", "cudnn"),
])
def test_sparse_config_refuses_unknown_choices_and_non_bool_flags(field, value):
    with pytest.raises(FiseditError, match=f"SparseConfig.{field}"):
        SparseConfig(**{field: value})


def test_sparse_config_refuses_a_conv_method_the_torch_path_would_ignore():
    with pytest.raises(FiseditError, match="conv_method='implicit'.*kernels='torch'"):
        SparseConfig(kernels="torch", conv_method="implicit")
    assert SparseConfig(kernels="torch").conv_method == SparseConfig.conv_method
    assert SparseConfig(kernels="auto", conv_method="implicit").conv_method == "implicit"


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 1, 7.5, np.float32(3.0)])
def test_check_guidance_scale_takes_scales_from_zero(value):
    assert check_guidance_scale("guidance_scale", value) == float(value)
    assert guides(float(value)) == (float(value) > 1)


@pytest.mark.parametrize("value, message", [
    (-0.5, "guidance_scale -0.5 is negative: diffusers applies classifier-free guidance only "
           "above 1 and runs every scale <= 1 without it"),
    (float("nan"), "guidance_scale must be a finite number"),
    ("7.5", "guidance_scale must be a number, got str"),
    (True, "guidance_scale must be a number"),
])
def test_check_guidance_scale_refuses_negative_and_non_numbers(value, message):
    with pytest.raises(FiseditError, match=re.escape(message)):
        check_guidance_scale("guidance_scale", value)
