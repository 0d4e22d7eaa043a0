"""The procedural shapes: deterministic per index, balanced, visible, and the right shape."""

import numpy as np

from dim_jax.data import shapes


def _fresh_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**31)


def test_an_example_is_a_function_of_its_index_only():
  rng = np.random.default_rng(seed := _fresh_seed())
  indices = rng.integers(0, 10**9, size=5)
  source = shapes.ShapesSource(num_examples=10**9 + 1, image_size=24)
  for index in indices:
    first, again = source[int(index)], source[int(index)]
    np.testing.assert_array_equal(first["image"], again["image"], err_msg=f"seed={seed}")
    assert first["image"].shape == (24, 24, 3) and first["image"].dtype == np.uint8
  assert not np.array_equal(source[int(indices[0])]["image"], source[int(indices[0]) + 4]["image"])


def test_classes_are_balanced_and_every_shape_stands_out_from_its_background():
  start = int(np.random.default_rng(seed := _fresh_seed()).integers(0, 10**6))
  source = shapes.ShapesSource(num_examples=10**7, image_size=32)
  labels = [source[i]["label"] for i in range(start, start + 40)]
  assert np.bincount(labels, minlength=4).tolist() == [10] * 4, f"seed={seed}"
  for i in range(start, start + 40):
    image = source[i]["image"].astype(np.int64)
    background = image[0, 0]  # the corners lie outside every shape (centre >= r from each edge)
    difference = np.abs(image - background).max(axis=-1)  # (S, S)
    assert (image[0, -1] == background).all() and (image[-1, 0] == background).all()
    assert difference.max() >= 0.4 * 255 - 1, f"index {i}: shape barely visible"
    inside = difference > difference.max() / 2
    assert 0.02 < inside.mean() < 0.6, f"index {i}: shape covers {inside.mean():.2f}"


def test_circles_are_discs():
  """Pixels well inside the disc that the covered area implies are foreground, well outside not."""
  start = 4 * int(np.random.default_rng(seed := _fresh_seed()).integers(0, 10**6))
  size = 48
  source = shapes.ShapesSource(num_examples=10**7, image_size=size)
  for i in range(start, start + 4 * 6, 4):  # labels 0: circles
    assert source[i]["label"] == 0
    image = source[i]["image"].astype(np.float64)
    background = image[0, 0]
    difference = image - background
    channel = np.argmax(np.abs(difference).reshape(-1, 3).max(axis=0))
    coverage = (
      difference[..., channel]
      / difference[..., channel].flat[np.argmax(np.abs(difference[..., channel]))]
    )  # (S, S) in [0, 1]: fraction of each pixel covered
    area = coverage.sum()
    y, x = np.mgrid[0:size, 0:size] + 0.5
    centre = np.array([(coverage * y).sum(), (coverage * x).sum()]) / area
    radius = np.sqrt(area / np.pi)
    distance = np.hypot(y - centre[0], x - centre[1])
    assert (coverage[distance < radius - 1] > 0.99).all(), f"seed={seed} index {i}"
    assert (coverage[distance > radius + 1] < 0.01).all(), f"seed={seed} index {i}"


def test_class_colours_and_upright_shapes():
  """by_class: the class colour inside, the dark background at the corners; no rotation: a square
  fills its bounding box, which a rotated square does not."""
  start = 4 * int(np.random.default_rng(seed := _fresh_seed()).integers(0, 10**6))
  upright = shapes.ShapesSource(10**7, 32, colours="by_class", rotate=False)
  rotated = shapes.ShapesSource(10**7, 32, colours="by_class")
  fills = []
  for i in range(start, start + 4 * 8):
    example = upright[i]
    image = example["image"].astype(np.float64) / 255
    np.testing.assert_allclose(image[0, 0], shapes.CLASS_BACKGROUND, atol=1 / 255)
    mask = np.abs(image - shapes.CLASS_BACKGROUND).max(axis=-1) > 0.3
    inside = image[mask & (np.abs(image - shapes.CLASS_COLOURS[example["label"]]).max(-1) < 0.01)]
    assert len(inside) > 0.3 * mask.sum(), f"seed={seed} index {i}: not the class colour"
    if example["label"] == 1:  # squares
      for source, kind in ((upright, "upright"), (rotated, "rotated")):
        square = np.abs(source[i]["image"] / 255 - shapes.CLASS_BACKGROUND).max(-1) > 0.5
        rows, cols = np.nonzero(square)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append((kind, square.sum() / box))
  assert all(f > 0.85 for kind, f in fills if kind == "upright"), (seed, fills)
  assert np.mean([f for kind, f in fills if kind == "rotated"]) < 0.85, (seed, fills)
