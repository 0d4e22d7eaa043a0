"""Offline demo: a small DiM learns procedural coloured shapes at 32², on a CPU in minutes.

No download, no file to fetch: the data set is generated from the example index.

  python -m dim_jax.main --config=configs/demo.py --workdir=workdir/demo   # or: make demo
"""

from dim_jax.configs import common


def get_config(arg=None):

  c = common.base_config()
  c.model.update(width=64, depth=9, patch_size=4, d_state=8, input_size=32, in_channels=3)
  c.model.num_classes = 4
  c.data.update(name="shapes", image_size=32)
  # A higher rate and the usual Adam betas than the paper's, so that minutes on a CPU suffice.
  c.optim.update(learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=20, weight_decay=0.0)
  c.train.update(batch_size=16, num_steps=500, log_every=50, checkpoint_every=250)
  c.sample.update(sampler="ddim", steps=25, guidance_scale=2.0, num_images=16, batch_size=16)
  return common.apply_arg(c, arg)
