"""Test driver: trains a tiny demo config in a subprocess and dumps the final parameters to .npz.

The caller sets the device count with XLA_FLAGS.

  python tests/train_and_dump.py WORKDIR NUM_STEPS DATA FSDP OUT.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dim_jax import checkpoint, train  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402


def main(workdir, num_steps, data_axis, fsdp_axis, out):
  config = tiny_config(num_steps=int(num_steps))
  config.mesh.update(data=int(data_axis), fsdp=int(fsdp_axis))
  config.train.checkpoint_every = 2
  state = train.train_and_evaluate(config, workdir)
  flat = {
    checkpoint.param_name(p): np.asarray(jax.device_get(x))
    for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
  }
  np.savez(out, step=int(state["step"]), devices=jax.device_count(), **flat)


if __name__ == "__main__":
  main(*sys.argv[1:])
