"""Any folder of images: class sub-folders become labels, a flat folder is unconditional.

  root/cat/001.jpg, root/dog/x/002.png, ...  -> labels by sorted folder name (cat 0, dog 1);
                                                files anywhere below a class folder count
  root/001.jpg, root/002.png, ...            -> unconditional: num_classes 0, every label 0

Files are listed once, sorted (the same order in every process and on every restart). Files
without an image extension are ignored; in a folder with class sub-folders, images lying loose
at the top are ignored with a warning.
"""

import os

from absl import logging

from dim_jax.data.decoded import DecodedImageSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(folder: str) -> list[str]:
  paths = []
  for parent, dirs, files in os.walk(folder, followlinks=True):
    dirs.sort()
    paths.extend(os.path.join(parent, name) for name in sorted(files) if _is_image(name))
  return paths


def list_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
  """root -> (image paths, labels, class names); one clear error if there is nothing to train on."""
  if not os.path.isdir(root):
    raise ValueError(f"data.data_dir={root!r} is not a directory; point it at a folder of images.")
  entries = sorted(os.scandir(root), key=lambda entry: entry.name)
  class_names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
  loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
  if not class_names:
    paths, labels = loose, [0] * len(loose)
  else:
    if loose:
      logging.warning(
        "ignoring %d images at the top of %s (it has class folders)", len(loose), root
      )
    paths, labels = [], []
    for label, name in enumerate(class_names):
      found = _images_below(os.path.join(root, name))
      if not found:
        raise ValueError(
          f"class folder {os.path.join(root, name)!r} has no images; remove it or add images."
        )
      paths += found
      labels += [label] * len(found)
  if not paths:
    raise ValueError(
      f"data.data_dir={root!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); put images in it, "
      "directly (unconditional) or in one sub-folder per class."
    )
  return paths, labels, class_names


class ImageFolderSource(DecodedImageSource):
  """Images under `root`, ADM centre-cropped to `image_size`² RGB."""

  def __init__(self, root: str, image_size: int, random_flip: bool = True):
    self.paths, self.labels, self.class_names = list_image_folder(root)
    self.image_size, self.random_flip = image_size, random_flip
    self.image_shape = (image_size, image_size, 3)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, index: int) -> tuple[bytes, int]:
    with open(self.paths[index], "rb") as f:
      return f.read(), self.labels[index]

  def describe(self, index: int) -> str:
    return self.paths[index]
