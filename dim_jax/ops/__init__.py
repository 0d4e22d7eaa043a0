"""Operations the models are built from: the selective scan (`scan/`)."""

from dim_jax.ops.scan import ScanConfig, selective_scan

__all__ = ["ScanConfig", "selective_scan"]
