"""DiM-H/2 samples at 1024² from its 512² fine-tune with no training (DiM §3.4, m = 2).

Upsample guidance (dim_jax/diffusion/upsample.py) over the finetune_512 checkpoint as stored: the
64² latent position table is resized to 128² on the fly and the rho_pad padding tokens fill the
larger grid. CFG w = 4 (official s = 3) at both resolutions, guidance in the first 30 % of the
reverse trajectory, 50-evaluation DPM-Solver "fast" (here its ++ data-prediction form; the official
upsampling run uses the noise-prediction form). Writes
<workdir>/sample_dpm_solver_fast_50steps_step<N>_upsample2x.png and .npz:

  python -m dim_jax.main --config=configs/upsample_1024.py --mode=sample \\
      --workdir=gs://bucket/dim_h_512 --config.vae.path=/path/to/diffusion_pytorch_model.safetensors
  python -m dim_jax.main --config=configs/upsample_1024.py:smoke --mode=sample \\
      --workdir=/tmp/smoke512                                      # after finetune_512:smoke
"""

from dim_jax.configs import common, finetune_512


def get_config(arg=None, scale=2):
  c = finetune_512.get_config()  # model.input_size stays 64: the grid the checkpoint stores
  c.sample.update(sampler="dpm_solver_fast", steps=50, guidance_scale=4.0, num_images=16)
  c.sample.batch_size = 8  # 2B = 16 per backbone call; fits one H200 at 1536² (README)
  c.sample.upsample.update(scale=scale, weight=1.0, active_fraction=0.3)
  return common.apply_arg(c, arg)
