"""DiM-S/2 on CIFAR-10 pixels, unconditional, continuous VP-SDE (official cifar10_S_DiM.py).

python -m dim_jax.main --config=configs/cifar10.py --workdir=/path/to/dim_s_cifar10
python -m dim_jax.main --config=configs/cifar10.py:smoke --workdir=/tmp/smoke_cifar
"""

from dim_jax.configs import common


def get_config(arg=None):
  c = common.base_config()
  c.model.update(variant="S/2", in_channels=3, input_size=32, num_classes=10, dtype="bfloat16")
  c.data.update(name="cifar10", image_size=32)
  # Unconditional: every label is the null class (p_uncond = 1).
  c.diffusion.update(schedule="vpsde", beta_min=0.1, beta_max=20.0, p_uncond=1.0)
  c.optim.update(
    learning_rate=2e-4,
    b1=0.99,
    b2=0.999,
    eps=1e-15,
    weight_decay=0.03,
    warmup_steps=2500,
    grad_clip_norm=0.0,
    ema_decay=0.9999,
  )
  c.train.update(batch_size=128, num_steps=500_000, checkpoint_every=10_000)
  # The paper's CIFAR sampler: Euler–Maruyama on the reverse SDE, 1000 steps, no guidance.
  c.sample.update(sampler="euler_maruyama", steps=1000, guidance_scale=1.0)
  # FID-10k every 50k steps with eval.inception_path and eval.ref_stats set; else a sample grid.
  c.eval.update(every=50_000, num_samples=10_000)
  return common.apply_arg(c, arg)
