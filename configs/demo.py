"""Offline demo: a small DiM learns to draw four shapes at 16², on a 2-core CPU in minutes.

No download, no file to fetch: the data set is generated from the example index. Circles, squares,
triangles and crosses of random size and position, each class in its own colour on a dark
background, upright: a distribution a CPU learns in minutes (the shapes' random colours and
rotations are `data.shape_colours` and `data.rotate_shapes`). At the end the run scores 128 EMA
samples with a classifier of the shapes' masks (class accuracy, FD-shapes), with held-out real
shapes and Gaussian noise scored beside them, and writes a grid of 16 samples.

  python -m dim_jax.main --config=configs/demo.py --workdir=workdir/demo   # or: make demo
"""

from dim_jax.configs import common


def get_config(arg=None):
  c = common.base_config()
  # 8 x 8 tokens of 2 x 2 pixels: the sequential CPU scan costs batch x tokens x channels x states.
  c.model.update(width=64, depth=7, patch_size=2, d_state=4, input_size=16, in_channels=3)
  c.model.num_classes = 4
  c.data.update(name="shapes", image_size=16, shape_colours="by_class", rotate_shapes=False)
  # A higher rate and the usual Adam betas than the paper's, so that minutes on a CPU suffice.
  c.optim.update(learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=20, weight_decay=0.0)
  c.optim.decay = "cosine"
  c.train.update(batch_size=32, num_steps=1200, log_every=100, checkpoint_every=600)
  c.sample.update(sampler="ddim", steps=25, guidance_scale=2.0, num_images=16, batch_size=16)
  # Scored once, at the end: eval.every follows train.num_steps (a derived reference, so setting
  # eval.every itself leaves train.num_steps alone).
  c.eval.update(every=c.train.get_ref("num_steps") * 1, num_samples=128)
  return common.apply_arg(c, arg)
