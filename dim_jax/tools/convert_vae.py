"""Checks an SD KL-f8 VAE checkpoint and rewrites it as a float32 safetensors file.

Reads a diffusers `diffusion_pytorch_model.safetensors` or the original `autoencoder_kl_ema.pth`
(no torch needed, no pickled code run), loads it into `AutoencoderKL` (every key and shape
checked) and, given an output path, writes the loaded parameters back with diffusers' (default)
or LDM's key names and PyTorch layouts. The result loads with `vae_weights.load_vae` anywhere,
also where no one should unpickle files.

  python -m dim_jax.tools.convert_vae assets/autoencoder_kl_ema.pth                # check only
  python -m dim_jax.tools.convert_vae assets/autoencoder_kl_ema.pth vae.safetensors
"""

import argparse
import os
import pickle
import sys

import jax
import safetensors.numpy
from flax import nnx

from dim_jax.models import vae_weights
from dim_jax.models.vae import SD_KL_F8, AutoencoderKL


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("source", help=".safetensors or .pth / .ckpt file")
  p.add_argument("output", nargs="?", help=".safetensors file to write (omit to only check)")
  p.add_argument("--naming", default="diffusers", choices=["diffusers", "ldm"])
  args = p.parse_args(argv)

  try:
    state = vae_weights.read_state_dict(args.source)
    vae = nnx.eval_shape(lambda: AutoencoderKL(SD_KL_F8, rngs=nnx.Rngs(0)))
    # Raises at the first missing, misshaped or unused key.
    naming = vae_weights.load_state_dict(vae, state, source=args.source)
  except (OSError, ValueError, pickle.UnpicklingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  dtypes = ", ".join(sorted({str(v.dtype) for v in state.values()}))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))
  print(f"{args.source}: {naming} names, {len(state)} tensors ({dtypes}), {count:,} parameters: OK")
  if args.output:
    if os.path.abspath(args.output) == os.path.abspath(args.source):
      p.error("the output would overwrite the source; give another path.")
    tensors = vae_weights.export_state_dict(vae, args.naming)
    metadata = {"format": "pt", "source": os.path.basename(args.source), "naming": args.naming}
    safetensors.numpy.save_file(tensors, args.output, metadata)
    print(f"wrote {args.output}: {len(tensors)} float32 tensors, {args.naming} names")
  return 0


if __name__ == "__main__":
  sys.exit(main())
