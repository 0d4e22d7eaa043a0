"""Classifier-free guidance (Ho & Salimans 2022) in one batched backbone call."""

import jax.numpy as jnp


def guided_eps(denoise_fn, x, t_net, labels, *, guidance_scale: float, null_label: int):
  """ε = ε_u + w (ε_c - ε_u), the conditional and unconditional halves in one call of batch 2B.

  x (B, H, W, C), t_net (B,), labels (B,) -> ε (B, H, W, C). w = guidance_scale, a Python float.
  The official DiM / U-ViT code writes ε_c + s (ε_c - ε_u) with two separate passes
  (`eval_ldm_discrete.py`), the same thing with w = 1 + s: their s = 0.4 at 256² is
  w = 1.4 here. w = 1 is the conditional model alone: no unconditional pass is made at all.
  """
  if guidance_scale == 1.0:
    return denoise_fn(x, t_net, labels)
  both = denoise_fn(
    jnp.concatenate([x, x]),  # (2B, H, W, C)
    jnp.concatenate([t_net, t_net]),
    jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
  )
  eps_c, eps_u = jnp.split(both, 2)
  return eps_u + guidance_scale * (eps_c - eps_u)
