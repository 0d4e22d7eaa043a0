"""Classifier-free guidance in one batched backbone call."""

import jax.numpy as jnp


def guided_eps(denoise_fn, x, t_net, labels, *, guidance_scale: float, null_label: int):
  """ε = ε_u + w (ε_c - ε_u), with the conditional and unconditional halves in one call.

  w = guidance_scale; the official DiM / U-ViT code writes ε_c + s (ε_c - ε_u), i.e. w = 1 + s.
  w = 1 is the conditional model alone: no unconditional pass is made at all.
  """
  if guidance_scale == 1.0:
    return denoise_fn(x, t_net, labels)
  both = denoise_fn(
    jnp.concatenate([x, x]),
    jnp.concatenate([t_net, t_net]),
    jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
  )
  eps_c, eps_u = jnp.split(both, 2)
  return eps_u + guidance_scale * (eps_c - eps_u)
