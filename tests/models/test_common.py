"""``models/common.py``: the action convention (``frame_actions``), patch grids, cached attention.

The convention, defined once in ``frame_actions``: ``actions[t]`` is the move from frame t to frame
t+1, so frame t+1 is predicted from frames <= t and the actions up to t; frame t is conditioned on
``actions[t-1]`` and frame 0 on none. The models' own tests check that each family applies it
(``tests/models/test_*_dynamics.py``); these check the definition itself.
"""
from __future__ import annotations

import pytest
import torch

from models.common import SelfAttention, frame_actions, patchify, unpatchify


def transitions(b: int = 2, t: int = 6) -> torch.Tensor:
    """Per-transition actions (B, T, 2) whose values name their sequence and transition: 100 b + t."""
    idx = 100 * torch.arange(b)[:, None] + torch.arange(t)[None, :]
    return torch.stack([idx, -idx], dim=-1).float() + 1  # + 1: no action is the zero vector


def test_frame_t_gets_the_move_that_led_to_it():
    """Guards a dropped shift (frame t conditioned on actions[t], the move out of it, i.e. the
    future) and a shift the wrong way (actions[t+1])."""
    actions = transitions()
    cond, has = frame_actions(actions)
    assert cond.shape == actions.shape and has.shape == (2, 6) and has.dtype == torch.bool
    assert torch.equal(cond[:, 0], torch.zeros(2, 2)) and not has[:, 0].any()   # frame 0: no action
    for t in range(1, 6):
        assert torch.equal(cond[:, t], actions[:, t - 1]), t                       # the move t-1 -> t
    assert has[:, 1:].all()
    # written out for sequence 0: the last transition (out of the last frame) conditions no frame
    assert cond[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert not torch.isin(actions[:, -1], cond).any()


def test_discrete_actions_shift_the_same_way():
    classes = torch.tensor([[3, 1, 4, 2, 0]])
    cond, has = frame_actions(classes, torch.ones(1, 5, dtype=torch.bool))
    assert cond.tolist() == [[0, 3, 1, 4, 2]] and cond.dtype == classes.dtype
    assert has.tolist() == [[False, True, True, True, True]]


def test_invalid_transitions_propagate_to_the_frame_they_lead_to():
    """``valid[t]`` False (an episode's last transition, in a window that spans it) means frame
    t+1 has no action; frame t keeps the one that led to it."""
    actions = transitions(1, 6)
    valid = torch.tensor([[True, True, False, True, True, False]])
    cond, has = frame_actions(actions, valid)
    assert has.tolist() == [[False, True, True, False, True, True]]
    # the values are still shifted; ``has`` says which ones count
    assert torch.equal(cond[:, 1:], actions[:, :-1])


def test_frame_actions_does_not_write_into_its_input():
    actions = transitions()
    before = actions.clone()
    cond, _ = frame_actions(actions)
    cond += 1
    assert torch.equal(actions, before)


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8, 4), 2), ((1, 2, 8, 4, 3), 4), ((1, 1, 6, 6, 1), 3)])
def test_patchify_round_trips(shape, p):
    z = torch.randn(shape)
    x = patchify(z, p)
    b, t, h, w, c = shape
    assert x.shape == (b, t, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(x, p, h, w), z)


def test_patch_tokens_are_row_major_blocks():
    z = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).reshape(1, 2, 4, 6, 3)
    x = patchify(z, 2)                                      # 2 x 3 patches per frame
    for t in range(2):
        for i in range(2):
            for j in range(3):
                block = z[0, t, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]   # (p, p, C), row-major inside
                assert torch.equal(x[0, t, 3 * i + j], block.reshape(-1)), (t, i, j)


def test_patchify_refuses_a_size_that_does_not_divide_the_grid():
    with pytest.raises(ValueError, match=r"patch size 3 must divide the latent grid 4x6"):
        patchify(torch.zeros(1, 1, 4, 6, 2), 3)


@pytest.mark.parametrize("lead", [(2,), (2, 3)])
@pytest.mark.parametrize("split", [1, 3, 4])
def test_attention_with_a_key_value_prefix_equals_the_full_causal_call(lead, split):
    """Causal attention over a sequence equals the same attention run on its first ``split``
    positions, then on the rest with the first part's keys and values as the prefix."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 4).eval()
    x = torch.randn(*lead, 5, 16)
    with torch.no_grad():
        full = attn(x, is_causal=True)
        y1, kv = attn(x[..., :split, :], is_causal=True, return_kv=True)
        y2, kv2 = attn(x[..., split:, :], is_causal=True, past=kv, return_kv=True)
    assert kv[0].shape == (*lead, 4, split, 4)
    assert kv2[0].shape == (*lead, 4, 5 - split, 4)       # a call returns its own keys, not the prefix's
    torch.testing.assert_close(torch.cat([y1, y2], dim=-2), full, rtol=1e-5, atol=1e-6)


def test_attention_prefix_is_attended_to():
    """The prefix is not ignored: changing the cached keys/values changes the later outputs."""
    torch.manual_seed(0)
    attn = SelfAttention(8, 2).eval()
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        _, kv = attn(x[:, :2], is_causal=True, return_kv=True)
        y = attn(x[:, 2:], is_causal=True, past=kv)
        y_other = attn(x[:, 2:], is_causal=True, past=(kv[0].flip(-2) + 1, kv[1] + 1))
        y_alone = attn(x[:, 2:], is_causal=True)
    assert not torch.allclose(y, y_other) and not torch.allclose(y, y_alone)


def test_attention_refuses_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="dim 10 must be a multiple of heads 4"):
        SelfAttention(10, 4)
