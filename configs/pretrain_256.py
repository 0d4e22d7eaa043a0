"""DiM-H/2 on ImageNet 256² latents: the paper's main recipe (official imagenet256_H_DiM.py).

Latents come from the Stable Diffusion KL-f8 VAE, extracted once (`--mode=extract_latents`, see the
README); each step samples the stored posterior and scales it by 0.18215.

  python -m dim_jax.main --config=configs/pretrain_256.py --workdir=gs://bucket/dim_h_256 \\
      --config.data.data_dir=/path/to/imagenet256_latents
  python -m dim_jax.main --config=configs/pretrain_256.py:smoke --workdir=/tmp/smoke  # CPU smoke
"""

from dim_jax.configs import common


def get_config(arg=None):
  c = common.base_config()
  c.model.update(
    variant="H/2",
    in_channels=4,
    input_size=32,
    num_classes=1000,
    pad_layout="lateral",
    dtype="bfloat16",
    remat="block",
  )
  c.data.update(name="latents", image_size=32)
  c.diffusion.update(schedule="discrete", p_uncond=0.1)
  c.optim.update(
    learning_rate=2e-4,
    b1=0.99,
    b2=0.99,
    eps=1e-15,
    weight_decay=0.03,
    weight_decay_on="all",
    warmup_steps=5000,
    grad_clip_norm=1.0,
    ema_decay=0.9999,
  )
  c.train.update(batch_size=768, num_steps=750_000, log_every=100, checkpoint_every=5000)
  # FID setting: DPM-Solver "fast", 50 evaluations, CFG w = 1.4 (official s = 0.4).
  c.sample.update(sampler="dpm_solver_fast", steps=50, guidance_scale=1.4)
  # FID-10k of the EMA weights every 25k steps once eval.inception_path and eval.ref_stats are
  # set (`--mode=evaluate` gives the paper's FID-50k); without them, a sample grid.
  c.eval.update(every=25_000, num_samples=10_000)
  # FSDP over every chip, the batch split over all of them: each chip runs its layers' scans on
  # its own 768 / chips rows (parallel.map_batch_shards: a Pallas kernel is opaque to the
  # partitioner), so no scan input crosses chips; benchmarks/tpu_lowering.py shows it for TPU.
  c.mesh.update(data=1, fsdp=-1)
  return common.apply_arg(c, arg)
