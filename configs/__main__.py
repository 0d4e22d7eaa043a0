"""`python -m dim_jax.configs` prints the folder of the recipes, for `--config=<folder>/demo.py`."""

import os

print(os.path.dirname(os.path.abspath(__file__)))
