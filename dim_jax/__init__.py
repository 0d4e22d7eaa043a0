"""DiM (Diffusion Mamba, arXiv 2405.14224) in JAX / Flax NNX."""
