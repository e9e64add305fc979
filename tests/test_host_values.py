"""engine.host_values: a small device tensor read on the host, its storage copied once.

On the CPU the copy is an alias, but the bookkeeping (when a storage is copied again) is the
same as on a GPU, where each copy is a synchronisation; the GPU side (no synchronisation in
an edit pass's later steps) is tested in test_cuda_graph.py."""

import torch

from fisedit_compiler.engine.host_values import MAX_MIRRORED_BYTES, HostValues


def test_views_of_one_storage_are_read_from_one_copy():
    timesteps = torch.linspace(999, 0, 50)
    reader = HostValues()
    for step, t in enumerate(timesteps):          # views, as a pipeline's loop yields them
        assert torch.equal(reader.read(t), timesteps[step])
    assert torch.equal(reader.read(timesteps[10:20:3]), timesteps[10:20:3])
    # Pipelines that pass one timestep per latent broadcast it: a view with stride 0.
    assert torch.equal(reader.read(timesteps[7].expand(2)), timesteps[7].expand(2))
    assert torch.equal(reader.read(timesteps[7][None]), timesteps[7:8])
    assert reader.copies == 1


def test_an_in_place_write_or_another_storage_is_copied_again():
    timesteps = torch.arange(10, dtype=torch.int64)
    reader = HostValues()
    assert int(reader.read(timesteps[3])) == 3
    timesteps.mul_(2)                             # bumps the version counter of every view
    assert int(reader.read(timesteps[3])) == 6
    other = torch.arange(10, dtype=torch.int64) + 100
    assert int(reader.read(other[3])) == 103
    assert int(reader.read(timesteps[4])) == 8
    assert reader.copies == 4


def test_other_dtypes_shapes_and_large_storages():
    reader = HostValues()
    batched = torch.tensor([[1.5, 2.5], [3.5, 4.5]], dtype=torch.float16)
    assert torch.equal(reader.read(batched.t()), batched.t())
    assert reader.read(batched.t()).dtype == torch.float16
    large = torch.zeros(MAX_MIRRORED_BYTES // 4 + 1)
    assert torch.equal(reader.read(large[5:7]), large[5:7])
    assert reader.copies == 1, "a large storage is read on its own, not kept"


def test_an_inference_tensor_is_read_on_its_own():
    """Made under torch.inference_mode, a tensor has no version counter to tell a write."""
    with torch.inference_mode():
        timesteps = torch.arange(10, dtype=torch.int64)
    reader = HostValues()
    assert int(reader.read(timesteps[3])) == 3
    with torch.inference_mode():
        timesteps.mul_(2)
    assert int(reader.read(timesteps[3])) == 6
    assert reader.copies == 0
