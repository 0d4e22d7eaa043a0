"""DiM-H/2 fine-tuned at 512² from the 256² model (official imagenet512_H_DiM_ft.py).

Starts from a pretrain_256 workdir: the position table is resized 16² -> 32², the padding layout
becomes rho_pad, the EMA restarts from the weights and the optimizer starts fresh.

  python -m dim_jax.main --config=configs/finetune_512.py --workdir=gs://bucket/dim_h_512 \\
      --config.train.init_from=gs://bucket/dim_h_256 --config.data.data_dir=/path/to/latents512
  python -m dim_jax.main --config=configs/finetune_512.py:smoke --workdir=/tmp/smoke512 \\
      --config.train.init_from=/tmp/smoke                                   # after pretrain:smoke
"""

from dim_jax.configs import common, pretrain_256


def get_config(arg=None):
  c = pretrain_256.get_config()
  c.model.update(input_size=64, pad_layout="rho_pad")
  c.data.update(image_size=64)
  c.diffusion.p_uncond = 0.15
  c.optim.update(learning_rate=1e-4, weight_decay=0.0, warmup_steps=2500)
  c.train.update(batch_size=240, num_steps=64_000)
  # FID setting at 512²: w = 1.7 (official s = 0.7).
  c.sample.guidance_scale = 1.7
  return common.apply_arg(c, arg)
