"""pytorch-fid's Inception weights (.pth) -> the `.npz` that dim_jax.models.inception loads.

  python -m dim_jax.tools.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The .pth is pytorch-fid's release asset (tag `fid_weights`); fetch it wherever you have a network.
Only this conversion needs torch (any CPU build), and it reads the file with
`torch.load(..., weights_only=True)`, which unpickles tensors and containers only, never code. The
`.npz` it writes needs no torch. The mapping is strict, as load_state_dict(strict=True): every
array of the FID network must be present with its reference shape, and nothing else may be there
(`num_batches_tracked` counters excepted), so torchvision's ImageNet InceptionV3 is refused.
"""

import argparse
import os
from collections.abc import Mapping

import numpy as np

from dim_jax.models import inception

# NNX leaf name -> PyTorch leaf name (ConvBN.conv / .bn and the final fc).
_TORCH_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
_IGNORED_SUFFIX = "num_batches_tracked"  # BatchNorm's step counter: no part of the function


def _torch_key(nnx_key: str) -> str:
  prefix, leaf = nnx_key.rsplit(".", 1)
  return f"{prefix}.{_TORCH_LEAF[leaf]}"


def _torch_shape(nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
  """NNX -> PyTorch layout: conv (kh, kw, I, O) -> (O, I, kh, kw); linear (I, O) -> (O, I)."""
  if len(nnx_shape) == 4:
    kh, kw, cin, cout = nnx_shape
    return (cout, cin, kh, kw)
  return tuple(reversed(nnx_shape))


def _to_nnx(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
  return array.T  # (O, I) -> (I, O); a transpose leaves 1-d arrays as they are


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PyTorch state dict (key -> array) -> {NNX key: float32 array in NNX layout}."""
  converted, used = {}, set()
  for nnx_key, nnx_shape in inception.weight_shapes().items():
    key, shape = _torch_key(nnx_key), _torch_shape(nnx_shape)
    if key not in state_dict:
      raise ValueError(
        f"state dict lacks {key} {shape}: give pytorch-fid's pt_inception-2015-12-05 weights."
      )
    array = np.asarray(state_dict[key], np.float32)
    if array.shape != shape:
      raise ValueError(
        f"state dict's {key} has shape {array.shape}, the FID network's {shape}: give "
        "pytorch-fid's pt_inception-2015-12-05 weights."
      )
    converted[nnx_key] = np.ascontiguousarray(_to_nnx(array))
    used.add(key)
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIX))
  if unexpected:
    raise ValueError(
      f"state dict holds {len(unexpected)} keys the FID network lacks (e.g. {unexpected[0]}): "
      "torchvision's ImageNet InceptionV3 is not the FID network; give pytorch-fid's weights."
    )
  return converted


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict -> {key: numpy array}, unpickling tensors only (weights_only=True)."""
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} not found: give the path of pt_inception-2015-12-05-6726825d.pth.")
  try:
    import torch
  except ImportError:
    raise ValueError(
      "converting reads a .pth and needs torch: `pip install torch --index-url "
      "https://download.pytorch.org/whl/cpu` in any environment (the .npz needs no torch)."
    ) from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {key: value.detach().cpu().numpy() for key, value in state.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument(
    "out", help="the .npz to write (load it with models.inception.load_inception)"
  )
  args = parser.parse_args(argv)
  try:
    arrays = convert_state_dict(read_torch_state_dict(args.src))
  except ValueError as error:
    parser.exit(1, f"error: {error}\n")
  np.savez(args.out, **arrays)
  print(f"wrote {len(arrays)} arrays to {args.out}")


if __name__ == "__main__":
  main()
