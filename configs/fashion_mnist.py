"""A small class-conditional DiM on Fashion-MNIST 32² (offline: the Debian package's IDX files).

The development recipe behind benchmarks/quality.py (FD-FMNIST).

  python -m dim_jax.main --config=configs/fashion_mnist.py --workdir=workdir/fmnist \\
      --config.data.data_dir=/usr/share/datasets/fashion-mnist
  python -m dim_jax.main --config=configs/fashion_mnist.py:smoke --workdir=/tmp/smoke_fmnist
      # (a tiny model on the procedural shapes, like every :smoke: no Fashion-MNIST needed)
"""

from dim_jax.configs import common


def get_config(arg=None):
  c = common.base_config()
  c.model.update(width=256, depth=13, in_channels=1, input_size=32, num_classes=10)
  c.data.update(name="fashion_mnist", image_size=32, random_flip=False)
  c.diffusion.update(schedule="discrete", p_uncond=0.1)
  c.optim.update(learning_rate=3e-4, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=500)
  c.train.update(batch_size=128, num_steps=20_000, log_every=100, checkpoint_every=2000)
  c.sample.update(
    sampler="dpm_solver_fast", steps=50, guidance_scale=1.5, num_images=100, batch_size=500
  )
  # FD-FMNIST of 5000 EMA samples every 1000 steps (floor 0.46: test half against half).
  c.eval.update(every=1000, num_samples=5000)
  return common.apply_arg(c, arg)
