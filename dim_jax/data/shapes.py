"""The offline demo set: coloured geometric shapes drawn from the example index alone.

Example i is a circle, square, triangle or cross (label i % 4, so classes are balanced) of a
random size, rotation and position, all drawn from a generator seeded by i. Colours: "random"
(a random background and a foreground 0.4 to 0.6 away from it in every channel) or "by_class"
(each class its own colour on a dark background: a distribution small enough for a CPU to learn in
minutes); rotation can be turned off (squares and crosses axis-aligned, triangles pointing up).
No file, no download; any index of a set of any size can be read at any time, so grain can
shuffle, shard and resume it like a data set on disk. Edges are anti-aliased from a signed
distance to the shape, clipped to one pixel of coverage.
"""

import numpy as np

from dim_jax.data.base import ImageSource

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
COLOURINGS = ("random", "by_class")
CLASS_COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.25, 0.45, 1.0], [0.95, 0.85, 0.2]])
CLASS_BACKGROUND = np.array([0.08, 0.08, 0.1])


def _signed_distance(kind: int, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
  """Signed distance in pixels (negative inside) of a shape centred at 0 in its own frame.

  Polygons use the maximum of their edges' half-plane distances: exact inside and within a
  pixel of the edges, which is all the anti-aliasing needs.
  """
  if kind == 0:  # circle
    return np.hypot(x, y) - radius
  if kind == 1:  # square, half-side 0.8 r
    return np.maximum(np.abs(x), np.abs(y)) - 0.8 * radius
  if kind == 2:  # equilateral triangle with circumradius r (inradius r / 2)
    edges = [x * np.cos(a) + y * np.sin(a) for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)]
    return np.maximum.reduce(edges) - 0.5 * radius
  # cross: union of two bars of half-length r and half-width r / 3
  bar_x = np.maximum(np.abs(x) - radius, np.abs(y) - radius / 3)
  bar_y = np.maximum(np.abs(y) - radius, np.abs(x) - radius / 3)
  return np.minimum(bar_x, bar_y)


def render_shape(
  index: int, image_size: int, colours: str = "random", rotate: bool = True
) -> tuple[np.ndarray, int]:
  """Example `index` -> (uint8 (image_size, image_size, 3), label)."""
  rng = np.random.default_rng(index)
  label = index % len(SHAPE_NAMES)
  radius = rng.uniform(0.2, 0.4) * image_size
  centre = rng.uniform(radius, image_size - radius, size=2)
  angle = rng.uniform(0, 2 * np.pi) if rotate else 0.0
  if colours == "by_class":
    background, foreground = CLASS_BACKGROUND, CLASS_COLOURS[label]
  else:
    background = rng.uniform(0, 1, size=3)
    # Each foreground channel 0.4 to 0.6 away from the background (shifted around the colour
    # circle), so every shape stands out.
    foreground = (background + rng.uniform(0.4, 0.6, size=3)) % 1.0

  pixel = np.arange(image_size) + 0.5 - centre[:, None]  # (2, S): pixel centres - shape centre
  dy, dx = pixel[1][:, None], pixel[0][None, :]  # (S, 1), (1, S)
  cos, sin = np.cos(angle), np.sin(angle)
  distance = _signed_distance(label, cos * dx + sin * dy, -sin * dx + cos * dy, radius)  # (S, S)
  coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]  # (S, S, 1)
  image = background * (1 - coverage) + foreground * coverage  # (S, S, 3) in [0, 1]
  return np.round(image * 255).astype(np.uint8), label


def foreground_mask(images: np.ndarray) -> np.ndarray:
  """uint8 (B, S, S, 3) -> uint8 (B, S, S, 1): each pixel's colour distance from the background,
  scaled so that the farthest pixel of each image is 255. The background is the median of the
  image's border (the corners always lie outside the shape), so the mask keeps the geometry of
  an example and drops its two random colours."""
  x = images.astype(np.float32)
  border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # (B, 4S, 3)
  background = np.median(border, axis=1)[:, None, None]  # (B, 1, 1, 3)
  distance = np.sqrt(np.sum((x - background) ** 2, axis=-1, keepdims=True))
  peak = np.maximum(distance.max(axis=(1, 2, 3), keepdims=True), 1.0)
  return np.round(255 * distance / peak).astype(np.uint8)


class ShapesSource(ImageSource):
  """Random-access source of `num_examples` procedural shapes at `image_size`² (RGB, uint8)."""

  num_classes = len(SHAPE_NAMES)
  reads_files = False  # drawn from the index

  def __init__(
    self,
    num_examples: int,
    image_size: int,
    random_flip: bool = True,
    colours: str = "random",
    rotate: bool = True,
  ):
    if num_examples < 1:
      raise ValueError(f"data.num_examples={num_examples} must be at least 1.")
    if image_size < 8:
      raise ValueError(f"data.image_size={image_size} is too small for shapes; use at least 8.")
    if colours not in COLOURINGS:
      raise ValueError(f"data.shape_colours={colours!r}: use one of {COLOURINGS}.")
    self.colours, self.rotate = colours, rotate
    self.num_examples, self.image_size = num_examples, image_size
    self.image_shape = (image_size, image_size, 3)
    self.random_flip = random_flip

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    image, label = render_shape(int(index), self.image_size, self.colours, self.rotate)
    return {"image": image, "label": label}
