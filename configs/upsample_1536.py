"""DiM-H/2 samples at 1536² from its 512² fine-tune with no training (DiM §3.4, m = 3).

As configs/upsample_1024.py with m = 3 (latents 64² -> 192², 9806 tokens per image). Writes
<workdir>/sample_dpm_solver_fast_50steps_step<N>_upsample3x.png and .npz:

  python -m dim_jax.main --config=configs/upsample_1536.py --mode=sample \\
      --workdir=gs://bucket/dim_h_512 --config.vae.path=/path/to/diffusion_pytorch_model.safetensors
  python -m dim_jax.main --config=configs/upsample_1536.py:smoke --mode=sample \\
      --workdir=/tmp/smoke512                                      # after finetune_512:smoke
"""

from dim_jax.configs import upsample_1024


def get_config(arg=None):
  return upsample_1024.get_config(arg, scale=3)
