"""SD KL-f8 weights: the exact diffusers and original-LDM key sets (built here from the
architecture's definition) load completely and round-trip; missing, misshaped and unused keys are
refused naming the key; safetensors and torch zip files are read without torch and without
running pickled code."""

import collections
import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from dim_jax.models import vae_weights
from dim_jax.models.vae import AutoencoderKL, VAEConfig
from dim_jax.tools import convert_vae

SD = VAEConfig()
TINY = VAEConfig(block_out_channels=(8, 16, 16, 16), norm_groups=4)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


# --- the two checkpoint layouts, written from the architecture's definition -------------------


def diffusers_shapes(cfg: VAEConfig) -> dict:
  """{key: shape} of a diffusers AutoencoderKL state dict (Encoder / Decoder / UNetMidBlock2D)."""
  shapes = {}
  widths, latent, image = cfg.block_out_channels, cfg.latent_channels, cfg.in_channels

  def conv(name, cout, cin, k):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

  def norm(name, c):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

  def resnet(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cout, cin, 3)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.conv_shortcut", cout, cin, 1)

  def mid(name, c):
    resnet(f"{name}.resnets.0", c, c)
    norm(f"{name}.attentions.0.group_norm", c)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
      shapes[f"{name}.attentions.0.{proj}.weight"] = (c, c)  # nn.Linear
      shapes[f"{name}.attentions.0.{proj}.bias"] = (c,)
    resnet(f"{name}.resnets.1", c, c)

  conv("encoder.conv_in", widths[0], image, 3)
  cin = widths[0]
  for i, c in enumerate(widths):
    for j in range(cfg.layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
    if i < len(widths) - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    cin = c
  mid("encoder.mid_block", widths[-1])
  norm("encoder.conv_norm_out", widths[-1])
  conv("encoder.conv_out", 2 * latent, widths[-1], 3)
  conv("quant_conv", 2 * latent, 2 * latent, 1)
  conv("post_quant_conv", latent, latent, 1)
  reversed_widths = widths[::-1]
  conv("decoder.conv_in", reversed_widths[0], latent, 3)
  mid("decoder.mid_block", reversed_widths[0])
  cin = reversed_widths[0]
  for i, c in enumerate(reversed_widths):
    for j in range(cfg.layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
    if i < len(widths) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    cin = c
  norm("decoder.conv_norm_out", widths[0])
  conv("decoder.conv_out", image, widths[0], 3)
  return shapes


def ldm_shapes(cfg: VAEConfig) -> dict:
  """{key: shape} of the original LDM AutoencoderKL (ldm/modules/diffusionmodules/model.py):
  levels `down.{i}` / `up.{i}` both numbered from the full resolution, 1x1-conv attention."""
  shapes = {}
  widths, latent, image = cfg.block_out_channels, cfg.latent_channels, cfg.in_channels
  levels = len(widths)

  def conv(name, cout, cin, k):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

  def norm(name, c):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

  def block(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cout, cin, 3)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.nin_shortcut", cout, cin, 1)

  def mid(name, c):
    block(f"{name}.block_1", c, c)
    norm(f"{name}.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
      conv(f"{name}.attn_1.{proj}", c, c, 1)
    block(f"{name}.block_2", c, c)

  conv("encoder.conv_in", widths[0], image, 3)
  block_in = widths[0]
  for level in range(levels):
    for j in range(cfg.layers_per_block):
      block(f"encoder.down.{level}.block.{j}", block_in, widths[level])
      block_in = widths[level]
    if level != levels - 1:
      conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
  mid("encoder.mid", block_in)
  norm("encoder.norm_out", block_in)
  conv("encoder.conv_out", 2 * latent, block_in, 3)
  conv("quant_conv", 2 * latent, 2 * latent, 1)
  conv("post_quant_conv", latent, latent, 1)
  block_in = widths[-1]
  conv("decoder.conv_in", block_in, latent, 3)
  mid("decoder.mid", block_in)
  for level in reversed(range(levels)):
    for j in range(cfg.layers_per_block + 1):
      block(f"decoder.up.{level}.block.{j}", block_in, widths[level])
      block_in = widths[level]
    if level != 0:
      conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
  norm("decoder.norm_out", block_in)
  conv("decoder.conv_out", image, block_in, 3)
  return shapes


def random_state_dict(shapes: dict, rng, dtype=np.float32) -> dict:
  return {k: rng.standard_normal(s, dtype=np.float32).astype(dtype) for k, s in shapes.items()}


def _abstract_vae(cfg):
  return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


# --- key sets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_sd_state_dict_loads_completely_and_round_trips(naming):
  """At the real SD widths: 248 keys, 83,653,863 numbers; every one lands and comes back."""
  rng, seed = _rng()
  shapes = (diffusers_shapes if naming == "diffusers" else ldm_shapes)(SD)
  assert len(shapes) == 248 and sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
  state = random_state_dict(shapes, rng)
  vae = _abstract_vae(SD)
  assert vae_weights.load_state_dict(vae, state) == naming
  leaves = jax.tree.leaves(nnx.state(vae))
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  back = vae_weights.export_state_dict(vae, naming)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=f"{key}, seed {seed}")


def test_conversions_land_where_the_layer_reads_them():
  """A few parameters checked by hand: OIHW -> HWIO, (O, I) -> (I, O), 1x1 conv -> (I, O), and
  LDM's decoder level 3 is diffusers' up block 0."""
  rng, seed = _rng()
  ldm = random_state_dict(ldm_shapes(TINY), rng)
  vae = _abstract_vae(TINY)
  vae_weights.load_state_dict(vae, ldm)
  w = ldm["encoder.conv_in.weight"]  # (O, I, kh, kw)
  kernel = np.asarray(vae.encoder.conv_in.kernel[...])
  assert kernel[2, 0, 1, 5] == w[5, 1, 2, 0], seed
  q = ldm["decoder.mid.attn_1.q.weight"]  # (O, I, 1, 1)
  assert np.asarray(vae.decoder.mid_block.attentions[0].to_q.kernel[...])[3, 7] == q[7, 3, 0, 0]
  up = ldm["decoder.up.3.block.2.conv2.bias"]
  np.testing.assert_array_equal(vae.decoder.up_blocks[0].resnets[2].conv2.bias[...], up)
  norm = ldm["decoder.norm_out.weight"]
  np.testing.assert_array_equal(vae.decoder.conv_norm_out.scale[...], norm)


def test_legacy_attention_names_and_whole_sd_checkpoints_load():
  """Pre-0.14 diffusers files name the projections query/key/value/proj_attn; a whole SD
  checkpoint prefixes the VAE with first_stage_model. and LDM training adds loss.* keys."""
  rng, seed = _rng()
  state = random_state_dict(diffusers_shapes(TINY), rng)
  legacy = {}
  for key, value in state.items():
    for new, old in (
      ("to_q", "query"),
      ("to_k", "key"),
      ("to_v", "value"),
      ("to_out.0", "proj_attn"),
    ):
      key = key.replace(f".{new}.", f".{old}.")
    legacy[key] = value
  vae = _abstract_vae(TINY)
  assert vae_weights.load_state_dict(vae, legacy) == "diffusers_legacy"
  back = vae_weights.export_state_dict(vae, "diffusers")
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=f"{key}, seed {seed}")

  ldm = random_state_dict(ldm_shapes(TINY), rng)
  whole = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  whole["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4,), np.float32)
  whole["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
  vae = _abstract_vae(TINY)
  assert vae_weights.load_state_dict(vae, whole) == "ldm"
  back = vae_weights.export_state_dict(vae, "ldm")
  assert all(np.array_equal(back[k], v) for k, v in ldm.items()), seed


@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_missing_misshaped_and_unused_keys_are_refused_by_name(naming):
  rng, _ = _rng()
  state = random_state_dict((diffusers_shapes if naming == "diffusers" else ldm_shapes)(TINY), rng)
  key = sorted(k for k in state if "attn" in k or "attentions" in k)[int(rng.integers(8))]

  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ValueError, match=f"missing key '{key}'"):
    vae_weights.load_state_dict(_abstract_vae(TINY), missing)

  misshaped = dict(state, **{key: np.zeros([n + 1 for n in state[key].shape], np.float32)})
  with pytest.raises(ValueError, match=f"key '{key}' has shape"):
    vae_weights.load_state_dict(_abstract_vae(TINY), misshaped)

  extra = dict(state, **{"encoder.extra.weight": np.zeros((3,))})
  with pytest.raises(ValueError, match="key 'encoder.extra.weight'"):
    vae_weights.load_state_dict(_abstract_vae(TINY), extra)

  with pytest.raises(ValueError, match="not an SD KL-f8 VAE"):
    vae_weights.load_state_dict(_abstract_vae(TINY), {"conv.weight": np.zeros((1,))})


def test_other_widths_are_refused_with_the_first_bad_key():
  rng, _ = _rng()
  state = random_state_dict(
    diffusers_shapes(VAEConfig(block_out_channels=(8, 16, 16, 32), norm_groups=4)), rng
  )
  with pytest.raises(
    ValueError, match=r"key 'decoder\.conv_in\.bias' has shape \(32,\), the model expects \(16,\)"
  ):
    vae_weights.load_state_dict(_abstract_vae(TINY), state)


# --- files ------------------------------------------------------------------------------------


def _safetensors_by_hand(path, tensors: dict, dtypes: dict):
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, value in tensors.items():
    blob = np.asarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
    header[name] = {
      "dtype": dtypes[name],
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(blob)],
    }
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_written_by_hand_are_read(tmp_path):
  rng, seed = _rng()
  tensors = {
    "a.weight": rng.standard_normal((3, 2, 3, 3), dtype=np.float32),
    "b.half": rng.standard_normal((5,)).astype(np.float16),
    "c.bf16": rng.standard_normal((2, 7)).astype(ml_dtypes.bfloat16),
    "d.scalar": np.array(3.5, np.float64),
  }
  dtypes = {"a.weight": "F32", "b.half": "F16", "c.bf16": "BF16", "d.scalar": "F64"}
  _safetensors_by_hand(tmp_path / "hand.safetensors", tensors, dtypes)
  read = vae_weights.read_state_dict(str(tmp_path / "hand.safetensors"))
  assert set(read) == set(tensors)
  for name, value in tensors.items():
    assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
    np.testing.assert_array_equal(read[name], value, err_msg=f"{name}, seed {seed}")


def _fake_torch_modules():
  """Stand-ins named like torch's pickled globals, so that pickle writes exactly the references
  torch.save writes (torch._utils._rebuild_tensor_v2, torch.FloatStorage, ...) without torch."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = (
    "torch._utils",
    "_rebuild_tensor_v2",
  )
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  storage_types = {}
  for name in ("FloatStorage", "HalfStorage"):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
    storage_types[name] = cls
  return {"torch": torch, "torch._utils": utils}, storage_types


def _torch_zip_by_hand(path, state: dict, monkeypatch, wrap=False):
  """A torch >= 1.6 zip archive: archive/data.pkl (protocol 2, storages as persistent ids),
  archive/data/<key> raw little-endian bytes, archive/byteorder, archive/version. Tensors are
  pickled as _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks); every
  second tensor is stored transposed (a strided view) and two share one storage at an offset."""
  modules, storage_types = _fake_torch_modules()
  for name, module in modules.items():
    monkeypatch.setitem(sys.modules, name, module)
  storages = {}  # key -> (storage type, bytes, numel)

  class Storage:
    def __init__(self, key, values):
      kind = {np.float32: "FloatStorage", np.float16: "HalfStorage"}[values.dtype.type]
      storages[key] = (
        storage_types[kind],
        values.astype(values.dtype.newbyteorder("<")).tobytes(),
        values.size,
      )
      self.key = key

  class Tensor:
    def __init__(self, storage, offset, size, stride):
      self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
      return modules["torch._utils"]._rebuild_tensor_v2, self.args

  items = list(state.items())
  tensors = collections.OrderedDict((name, None) for name in state)
  for i, (name, value) in enumerate(items):
    if i == 1 and len(items) > 2:
      continue  # stored with item 2, below
    if i % 2 and value.ndim == 2:  # column-major storage: the tensor is a transposed view
      storage = Storage(str(i), np.ascontiguousarray(value.T).ravel())
      tensors[name] = Tensor(storage, 0, value.shape, (1, value.shape[0]))
    elif i == 2:  # items 1 and 2 share one storage: item 2 first, item 1 after it
      other = items[1][1]
      storage = Storage(str(i), np.concatenate([value.ravel(), other.ravel()]).astype(value.dtype))
      tensors[name] = Tensor(storage, 0, value.shape, _contiguous_strides(value.shape))
      tensors[items[1][0]] = Tensor(
        storage, value.size, other.shape, _contiguous_strides(other.shape)
      )
    else:
      storage = Storage(str(i), value.ravel())
      tensors[name] = Tensor(storage, 0, value.shape, _contiguous_strides(value.shape))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        kind, _, numel = storages[obj.key]
        return ("storage", kind, obj.key, "cpu", numel)
      return None

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump({"state_dict": tensors, "epoch": 3} if wrap else tensors)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    archive.writestr("archive/byteorder", "little")
    for key, (_, raw, _) in storages.items():
      archive.writestr(f"archive/data/{key}", raw)
    archive.writestr("archive/version", "3\n")
  for name in modules:
    monkeypatch.delitem(sys.modules, name)


def _contiguous_strides(shape):
  return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))


def _write_pth(path, state, monkeypatch, wrap=False):
  """torch.save where torch is installed; the same layout written by hand where it is not."""
  if not HAVE_TORCH:
    _torch_zip_by_hand(path, state, monkeypatch, wrap)
    return
  import torch

  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
  torch.save({"state_dict": tensors, "epoch": 3} if wrap else tensors, path)


def test_pth_reader_rebuilds_tensors(tmp_path, monkeypatch):
  rng, seed = _rng()
  state = {
    "a": rng.standard_normal((3, 4), dtype=np.float32),
    "b": rng.standard_normal((5,), dtype=np.float32),
    "c": rng.standard_normal((2, 3, 3, 3), dtype=np.float32),
    "d": rng.standard_normal((4, 6), dtype=np.float32),
    "e": rng.standard_normal((7,)).astype(np.float16),
  }
  for wrap in (False, True):
    path = tmp_path / f"w{wrap}.pth"
    _write_pth(path, state, monkeypatch, wrap)
    read = vae_weights.read_state_dict(str(path))
    assert list(read) == list(state)
    for name, value in state.items():
      assert read[name].dtype == value.dtype, name
      np.testing.assert_array_equal(read[name], value, err_msg=f"{name}, seed {seed}")


def test_pth_reader_runs_no_code(tmp_path):
  marker = tmp_path / "ran"
  payload = (  # GLOBAL os.system, the argument "touch <marker>", REDUCE: what a hostile file holds
    b"\x80\x02cos\nsystem\nq\x00X"
    + struct.pack("<I", len(f"touch {marker}"))
    + f"touch {marker}".encode()
    + b"\x85R."
  )
  path = tmp_path / "hostile.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match="os.system is not allowed"):
    vae_weights.read_state_dict(str(path))
  assert not marker.exists()


def test_load_vae_from_files(tmp_path, monkeypatch):
  """load_vae on a diffusers safetensors (float16, as some uploads are) and on an LDM .pth."""
  rng, seed = _rng()
  diffusers = random_state_dict(diffusers_shapes(TINY), rng, np.float16)
  safetensors.numpy.save_file(diffusers, str(tmp_path / "vae.safetensors"))
  vae = vae_weights.load_vae(str(tmp_path / "vae.safetensors"), config=TINY, dtype=jnp.bfloat16)
  back = vae_weights.export_state_dict(vae)
  assert all(np.array_equal(back[k], v.astype(np.float32)) for k, v in diffusers.items()), seed

  ldm = random_state_dict(ldm_shapes(TINY), rng)
  _write_pth(tmp_path / "autoencoder_kl_ema.pth", ldm, monkeypatch)
  vae = vae_weights.load_vae(str(tmp_path / "autoencoder_kl_ema.pth"), config=TINY)
  back = vae_weights.export_state_dict(vae, "ldm")
  assert all(np.array_equal(back[k], v) for k, v in ldm.items()), seed

  (tmp_path / "junk.bin").write_bytes(os.urandom(64))
  with pytest.raises(ValueError, match="neither a safetensors file nor a torch zip"):
    vae_weights.load_vae(str(tmp_path / "junk.bin"), config=TINY)


def test_convert_cli_rewrites_an_ldm_checkpoint_as_diffusers_safetensors(tmp_path, capsys):
  rng, seed = _rng()
  ldm = random_state_dict(ldm_shapes(SD), rng, np.float16)
  safetensors.numpy.save_file(ldm, str(tmp_path / "ldm.safetensors"))
  assert (
    convert_vae.main([str(tmp_path / "ldm.safetensors"), str(tmp_path / "out.safetensors")]) == 0
  )
  assert "ldm names, 248 tensors (float16), 83,653,863 parameters: OK" in capsys.readouterr().out
  written = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
  assert set(written) == set(diffusers_shapes(SD))
  assert all(v.dtype == np.float32 for v in written.values())
  back = vae_weights.export_state_dict(
    vae_weights.load_vae(str(tmp_path / "out.safetensors")), "ldm"
  )
  assert all(np.array_equal(back[k], v.astype(np.float32)) for k, v in ldm.items()), seed


@pytest.mark.parametrize("content", ["missing", "empty", "random", "zip"])
def test_convert_cli_answers_a_missing_or_junk_file_in_one_line(tmp_path, capsys, content):
  source = tmp_path / "vae.safetensors"
  junk = dict(empty=b"", random=os.urandom(64), zip=b"PK\x03\x04 not a zip")
  if content in junk:
    source.write_bytes(junk[content])
  assert convert_vae.main([str(source), str(tmp_path / "out.safetensors")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {source}: ") and err.count("\n") == 1, err
  assert not (tmp_path / "out.safetensors").exists()
