"""Backbones, built by name from the config: `create_model(config.model, rngs)`."""

import flax
from flax import nnx

from dim_jax.models.dim import DiM
from dim_jax.models.dit import build_dit
from dim_jax.models.layers import compute_dtype
from dim_jax.ops.scan import ScanConfig

# Parameters carry logical sharding names; the training step places them with jit out_shardings
# (parallel.py), so NNX must not try to shard them eagerly at creation (it would need a mesh).
flax.config.update("flax_always_shard_variable", False)

# DiM presets (the official configs): width, depth; "/2" is the patch size.
DIM_VARIANTS = {"S": (512, 25), "L": (1024, 49), "H": (1536, 49)}


def dim_preset(variant: str) -> dict:
  """'S/2' -> dict(width=512, depth=25, patch_size=2)."""
  try:
    size, patch = variant.split("/")
    width, depth = DIM_VARIANTS[size]
    return dict(width=width, depth=depth, patch_size=int(patch))
  except (ValueError, KeyError):
    raise ValueError(
      f"model.variant={variant!r}: use one of {[f'{k}/2' for k in DIM_VARIANTS]} or set it to "
      "'' and give model.width and model.depth."
    ) from None


def _build_dim(cfg, rngs: nnx.Rngs) -> DiM:
  arch = dict(width=cfg.width, depth=cfg.depth, patch_size=cfg.patch_size)
  if cfg.get("variant"):
    arch = dim_preset(cfg.variant)
  return DiM(
    in_channels=cfg.in_channels,
    input_size=cfg.input_size,
    num_classes=cfg.num_classes,
    d_state=cfg.d_state,
    d_conv=cfg.d_conv,
    expand=cfg.expand,
    pad_layout=cfg.pad_layout,
    scan_directions=cfg.scan_directions,
    scan=ScanConfig(**cfg.scan),
    remat=cfg.remat,
    stack_blocks=cfg.stack_blocks,
    dtype=compute_dtype(cfg.dtype),
    rngs=rngs,
    **arch,
  )


MODELS = {"dim": _build_dim, "dit": build_dit}


def create_model(model_config, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the backbone named by `model_config.name`; it maps (x_t, t, y) -> ε."""
  if model_config.name not in MODELS:
    raise ValueError(f"model.name={model_config.name!r}: use one of {sorted(MODELS)}.")
  return MODELS[model_config.name](model_config, rngs)
