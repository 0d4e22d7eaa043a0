"""Training recipes: each file's `get_config(arg)` returns an ml_collections.ConfigDict."""
