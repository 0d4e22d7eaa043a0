"""Training recipes: each file's `get_config(arg)` returns an ml_collections.ConfigDict.

From a checkout: `--config=configs/demo.py`. Installed, the same files are the package
`dim_jax.configs` (dim_jax/configs links here): `--config=$(python -m dim_jax.configs)/demo.py`.
"""
