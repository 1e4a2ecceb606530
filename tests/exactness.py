"""How tests prove exactness: weights bit for bit, float outputs at fp32 tolerance.

Float results differ in their last bits between CPUs (Intel vs AMD) and kernels, so no test compares model outputs
with atol=0. Integer layouts, token ids and pure data movement (packing, gathers) stay exact.
"""

import torch


def assert_same_weights(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Every tensor of the two state dicts is bitwise equal, under the same names."""
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
