"""Stable Diffusion KL-f8 weights from a local file into `vae.AutoencoderKL`: no download, no torch.

Two kinds of file are read:
- diffusers' `diffusion_pytorch_model.safetensors` (stabilityai/sd-vae-ft-ema, sd-vae-ft-mse):
  keys such as `encoder.down_blocks.0.resnets.0.conv1.weight`; uploads from before diffusers 0.14
  name the attention projections `query`/`key`/`value`/`proj_attn` instead of
  `to_q`/`to_k`/`to_v`/`to_out.0`;
- the original LDM / U-ViT `autoencoder_kl_ema.pth` (a torch >= 1.6 zip archive): keys such as
  `encoder.down.0.block.0.conv1.weight`, `mid.attn_1.q.weight`, the decoder's levels numbered the
  other way round (`decoder.up.3` is diffusers' `decoder.up_blocks.0`) and the attention
  projections stored as 1x1 convs. A whole SD checkpoint (`first_stage_model.` prefix) also works.

Layouts, PyTorch -> NNX: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); linear weight
(O, I) -> kernel (I, O); 1x1-conv projection (O, I, 1, 1) -> kernel (I, O); GroupNorm weight ->
scale; biases as they are. Every parameter of the model must be found with its exact shape and
every key of the file must be used; otherwise loading stops with the first offending key.

The `.pth` reader never runs code from the file: its unpickler rebuilds tensors from their raw
storages and refuses every other global (as `torch.load(weights_only=True)` does).
"""

import collections
import dataclasses
import io
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from dim_jax.models.vae import SD_KL_F8, AutoencoderKL, VAEConfig

NAMINGS = ("diffusers", "diffusers_legacy", "ldm")
_IGNORED_PREFIXES = ("loss.",)  # LDM training checkpoints carry the LPIPS / discriminator loss
_SD_PREFIX = "first_stage_model."  # the VAE inside a whole Stable Diffusion checkpoint

# ---------------------------------------------------------------------------------------------
# torch zip archives (`torch.save` since 1.6): <root>/data.pkl pickles the object with each
# storage as a persistent id ("storage", <dtype>Storage, key, location, numel); the storage's
# bytes are <root>/data/<key>; <root>/byteorder says "little" or "big" (little when absent).

_TORCH_STORAGES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a 1-D storage, copied."""
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if offset < 0 or any(s < 0 for s in stride) or last >= storage.size:
    raise ValueError(f"a tensor view (offset {offset}, size {size}) lies outside its storage.")
  strides = tuple(s * storage.itemsize for s in stride)
  return np.lib.stride_tricks.as_strided(storage[offset:], size, strides).copy()


def _rebuild_parameter(data, *unused):
  return data


class _WeightsUnpickler(pickle.Unpickler):
  """Rebuilds dicts of tensors and nothing else: every other global is refused, so no code from
  the file ever runs."""

  _ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  }

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage, self._storages = read_storage, {}

  def find_class(self, module, name):
    if module == "torch" and name in _TORCH_STORAGES:
      return _StorageType(np.dtype(_TORCH_STORAGES[name]))
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
        f"{module}.{name} is not allowed in a weights file (only tensors and dicts are read, no "
        "code runs); save a plain state dict (model.state_dict()) or a safetensors file."
      )
    return self._ALLOWED[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a weights file.")
    _, storage_type, key, _, numel = pid[:5]
    if key not in self._storages:
      self._storages[key] = self._read_storage(str(key), storage_type.dtype, numel)
    return self._storages[key]


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A torch zip archive holding a state dict (or {"state_dict": ...}) -> {key: array}."""
  if not zipfile.is_zipfile(path):
    raise ValueError(
      f"{path}: not a torch zip archive (what torch >= 1.6 saves); re-save it with a recent "
      "torch or convert it to safetensors."
    )
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found {pickles}.")
    root = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    order = archive.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
    if order not in ("little", "big"):
      raise ValueError(f"{path}: unknown byteorder {order!r}.")

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      raw = archive.read(f"{root}data/{key}")
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f"{path}: storage {key} has {len(raw)} bytes, not {numel} x {dtype}.")
      file_dtype = dtype.newbyteorder("<" if order == "little" else ">")
      return np.frombuffer(raw, file_dtype).astype(dtype)

    obj = _WeightsUnpickler(io.BytesIO(archive.read(pickles[0])), read_storage).load()
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # a PyTorch Lightning checkpoint
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f"{path}: expected a state dict (key -> tensor), got {type(obj).__name__}.")
  return dict(obj)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` file or a torch zip archive (`.pth`, `.ckpt`, `.bin`) -> {key: array}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; give a local VAE weights file.")
  if zipfile.is_zipfile(path):
    return read_torch_checkpoint(path)
  try:
    return safetensors.numpy.load_file(path)
  except safetensors.SafetensorError as e:
    raise ValueError(
      f"{path}: neither a safetensors file nor a torch zip archive (.pth): {e}."
    ) from None


# ---------------------------------------------------------------------------------------------
# Key names. The NNX modules carry diffusers' names; a few rules give the other two namings.

_NNX_TO_DIFFUSERS = {"kernel": "weight", "scale": "weight"}
_NNX_MODULES_TO_DIFFUSERS = {"downsample": "downsamplers.0", "upsample": "upsamplers.0"}
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out": "proj_attn"}
_LDM_RULES = (
  (r"\bdown_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
  (r"\bdown_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
  (r"\bmid_block\.resnets\.0\.", "mid.block_1."),
  (r"\bmid_block\.resnets\.1\.", "mid.block_2."),
  (r"\bmid_block\.attentions\.0\.", "mid.attn_1."),
  (r"\bconv_shortcut\.", "nin_shortcut."),
  (r"\bconv_norm_out\.", "norm_out."),
  (r"\bgroup_norm\.", "norm."),
  (r"\bto_([qkv])\.", r"\1."),
  (r"\bto_out\.0\.", "proj_out."),
)


def checkpoint_key(path: tuple, naming: str, num_levels: int) -> str:
  """NNX parameter path -> its key in a checkpoint of `naming` (one of NAMINGS)."""
  parts = [str(p) for p in path[:-1]]
  if naming == "diffusers_legacy":
    parts = [_LEGACY_ATTENTION.get(p, p) for p in parts]
  elif parts and parts[-1] == "to_out":
    parts.append("0")  # diffusers' to_out is a ModuleList (linear, dropout)
  parts = [_NNX_MODULES_TO_DIFFUSERS.get(p, p) for p in parts]
  key = ".".join(parts + [_NNX_TO_DIFFUSERS.get(path[-1], path[-1])])
  if naming == "ldm":
    for pattern, replacement in _LDM_RULES:
      key = re.sub(pattern, replacement, key)
    # LDM numbers the decoder's levels from the full resolution up, diffusers from the latent.
    key = re.sub(
      r"\bup_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
      lambda m: f"up.{num_levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
      key,
    )
  return key


def torch_shape(param_shape: tuple, naming: str) -> tuple:
  """The shape of a parameter in the PyTorch checkpoint (layouts in the module docstring)."""
  if len(param_shape) == 4:
    kh, kw, cin, cout = param_shape
    return (cout, cin, kh, kw)
  if len(param_shape) == 2:
    cin, cout = param_shape
    return (cout, cin, 1, 1) if naming == "ldm" else (cout, cin)
  return tuple(param_shape)


def to_param(weight: np.ndarray, param_ndim: int) -> np.ndarray:
  """PyTorch layout -> NNX layout, for a parameter of `param_ndim` dimensions."""
  if param_ndim == 2 and weight.ndim == 4:
    weight = weight[:, :, 0, 0]  # LDM's 1x1-conv attention projection is a linear map
  if weight.ndim == 4:
    return weight.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
  if weight.ndim == 2:
    return weight.T  # (O, I) -> (I, O)
  return weight


def from_param(param: np.ndarray, naming: str) -> np.ndarray:
  """NNX layout -> PyTorch layout of `naming`."""
  if param.ndim == 4:
    return param.transpose(3, 2, 0, 1)
  if param.ndim == 2:
    return param.T[:, :, None, None] if naming == "ldm" else param.T
  return param


def detect_naming(state_dict: dict) -> str:
  if "encoder.down_blocks.0.resnets.0.norm1.weight" in state_dict:
    legacy = any(re.search(r"\.(query|proj_attn)\.weight$", k) for k in state_dict)
    return "diffusers_legacy" if legacy else "diffusers"
  if "encoder.down.0.block.0.norm1.weight" in state_dict:
    return "ldm"
  raise ValueError(
    "the weights have neither diffusers key names ('encoder.down_blocks.0.resnets.0.norm1.weight')"
    " nor the original LDM ones ('encoder.down.0.block.0.norm1.weight'): not an SD KL-f8 VAE."
  )


def _vae_keys(state_dict: dict) -> dict:
  """Drops what is not the VAE: a whole SD checkpoint's other models, LDM's training loss."""
  if any(k.startswith(_SD_PREFIX) for k in state_dict):
    state_dict = {
      k[len(_SD_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_SD_PREFIX)
    }
  return {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}


def _flat_params(module: nnx.Module):
  return nnx.to_flat_state(nnx.state(module, nnx.Param))


def _num_levels(module: nnx.Module) -> int:
  config = getattr(module, "config", None)
  return len(config.block_out_channels) if isinstance(config, VAEConfig) else 0


def load_state_dict(
  module: nnx.Module, state_dict: dict, *, naming: str | None = None, source: str = "weights"
) -> str:
  """Writes `state_dict` (PyTorch layouts) into `module`'s parameters, in place; returns the
  naming it used. Any module of `vae` works (for a part, pass `naming`). Raises ValueError at
  the first missing or misshaped key, or at an unused key."""
  state_dict = _vae_keys(state_dict)
  naming = naming or detect_naming(state_dict)
  if naming not in NAMINGS:
    raise ValueError(f"naming={naming!r}: use one of {NAMINGS}.")
  flat, used = _flat_params(module), set()
  for path, variable in flat:
    key = checkpoint_key(path, naming, _num_levels(module))
    expected = torch_shape(tuple(variable.shape), naming)
    if key not in state_dict:
      raise ValueError(f"{source}: missing key {key!r} (shape {expected}); is it an SD KL-f8 VAE?")
    weight = np.asarray(state_dict[key])
    if tuple(weight.shape) != expected:
      raise ValueError(
        f"{source}: key {key!r} has shape {tuple(weight.shape)}, the model expects {expected}; "
        "the file is a different autoencoder (widths, latent channels) than the VAEConfig."
      )
    variable.set_value(jnp.asarray(to_param(weight, len(variable.shape)).astype(np.float32)))
    used.add(key)
  unused = sorted(set(state_dict) - used)
  if unused:
    raise ValueError(
      f"{source}: key {unused[0]!r} ({len(unused)} unused in all) has no place in "
      "the model; is it an SD KL-f8 VAE with this VAEConfig?"
    )
  nnx.update(module, nnx.from_flat_state(flat))
  return naming


def export_state_dict(module: nnx.Module, naming: str = "diffusers") -> dict[str, np.ndarray]:
  """The module's parameters as a float32 PyTorch state dict with `naming`'s keys and layouts,
  C-contiguous as safetensors writes them."""
  return {
    checkpoint_key(path, naming, _num_levels(module)): np.ascontiguousarray(
      from_param(np.asarray(var.get_value()), naming)
    )
    for path, var in _flat_params(module)
  }


def load_vae(path: str, *, config: VAEConfig = SD_KL_F8, dtype=jnp.float32) -> AutoencoderKL:
  """An AutoencoderKL (`dtype` = activation type) with the weights of a local checkpoint file."""
  vae = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
  load_state_dict(vae, read_state_dict(path), source=path)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(vae)))
  return vae
