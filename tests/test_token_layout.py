"""The token layout: scan directions, their schedule, padding tokens and un-padding."""

import numpy as np
import pytest

from dim_jax.models import layout

# The official per-layer pattern lists (reference notes §1.4), written out by hand.
OFFICIAL_49 = [0] + [-2, 1, -1, 0] * 6 + [-1, 1, -2, 0] * 6
OFFICIAL_25 = [0] + [-2, 1, -1, 0] * 3 + [-1, 1, -2, 0] * 3


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _order_by_hand(pattern, hp, wp):
  """Raster positions visited by a scan in `pattern` order, from the definition."""
  if pattern in (0, -2):
    order = [i * wp + j for i in range(hp) for j in range(wp)]
  else:
    order = [i * wp + j for j in range(wp) for i in range(hp)]
  return order[::-1] if pattern < 0 else order


def test_schedule_matches_official_lists():
  assert layout.scan_schedule(49) == OFFICIAL_49
  assert layout.scan_schedule(25) == OFFICIAL_25
  assert layout.scan_schedule(9, num_directions=1) == [0] * 9
  assert layout.scan_schedule(9, num_directions=2) == [0, -2, 0, -2, 0, -2, 0, -2, 0]


def test_schedule_rejects_even_depth():
  with pytest.raises(ValueError, match="odd depth"):
    layout.scan_schedule(48)


@pytest.mark.parametrize("pattern", layout.PATTERNS)
def test_each_direction_matches_definition_and_round_trips(pattern):
  rng, seed = _rng()
  hp, wp = rng.integers(2, 9, size=2)
  tokens = rng.normal(size=(2, hp * wp, 3)).astype(np.float32)
  scanned = np.asarray(layout.raster_to_pattern(tokens, pattern, (hp, wp)))
  expected = tokens[:, _order_by_hand(pattern, hp, wp)]
  np.testing.assert_array_equal(scanned, expected, err_msg=f"seed {seed}")
  back = np.asarray(layout.pattern_to_raster(scanned, pattern, (hp, wp)))
  np.testing.assert_array_equal(back, tokens, err_msg=f"seed {seed}")


def _simulate(schedule, hp, wp):
  """Runs the token ids through the layer schedule; returns (orders seen, skip checks)."""
  ids = np.arange(hp * wp, dtype=np.float32)[None, :, None]
  num_encoder = (len(schedule) - 1) // 2
  x, prev, skips, skip_ok = ids, 0, [], []
  for i, pattern in enumerate(schedule):
    if i > num_encoder:
      skip_ok.append(np.array_equal(skips.pop(), x))  # skip and stream in the same order
    x = np.asarray(layout.switch_pattern(x, prev, pattern, (hp, wp)))
    np.testing.assert_array_equal(x[0, :, 0], np.asarray(_order_by_hand(pattern, hp, wp)))
    prev = pattern
    if 1 <= i <= num_encoder:
      skips.append(x)
  return x, skip_ok


@pytest.mark.parametrize("depth", [9, 25, 49])
def test_schedule_ends_in_raster_and_skips_arrive_in_scan_order(depth):
  rng, seed = _rng()
  hp, wp = rng.integers(2, 7, size=2)
  final, skip_ok = _simulate(layout.scan_schedule(depth), hp, wp)
  np.testing.assert_array_equal(final[0, :, 0], np.arange(hp * wp), err_msg=f"seed {seed}")
  assert skip_ok and all(skip_ok), f"seed {seed}"


def _padded_by_hand(img, pads, h, w, fill):
  """Builds the padded grid with explicit loops (reference notes §1.5)."""
  hp, wp = h + 3, w + 3
  out = np.zeros((img.shape[0], hp * wp, img.shape[-1]), img.dtype)
  counter = 0
  for i in range(hp):
    for j in range(wp):
      if i < h and j < w:
        out[:, i * wp + j] = img[:, i * w + j]
        continue
      if fill == "lateral":
        k = i - h if i >= h else j - w
      else:
        k = counter % 3
      counter += 1
      out[:, i * wp + j] = pads[k]
  return out


@pytest.mark.parametrize("fill", layout.PAD_LAYOUTS)
def test_padding_matches_hand_construction_and_unpads_exactly(fill):
  rng, seed = _rng()
  h, w = rng.integers(1, 7, size=2)
  img = rng.normal(size=(2, h * w, 4)).astype(np.float32)
  pads = rng.normal(size=(3, 4)).astype(np.float32)
  padded = np.asarray(layout.pad_tokens(img, pads, h, w, fill))
  np.testing.assert_array_equal(padded, _padded_by_hand(img, pads, h, w, fill), f"seed {seed}")
  np.testing.assert_array_equal(np.asarray(layout.unpad_tokens(padded, h, w)), img, f"seed {seed}")


def test_lateral_pads_follow_every_row_in_order():
  img = np.zeros((1, 4, 1), np.float32)
  pads = np.array([[1.0], [2.0], [3.0]], np.float32)
  grid = np.asarray(layout.pad_tokens(img, pads, 2, 2, "lateral"))[0, :, 0].reshape(5, 5)
  np.testing.assert_array_equal(grid[0], [0, 0, 1, 2, 3])
  np.testing.assert_array_equal(grid[:, 0], [0, 0, 1, 2, 3])
  np.testing.assert_array_equal(grid[3], [2, 2, 2, 2, 2])


def test_unknown_pad_layout_is_refused():
  with pytest.raises(ValueError, match="pad_layout"):
    layout.pad_tokens(np.zeros((1, 4, 2)), np.zeros((3, 2)), 2, 2, "zigzag")
