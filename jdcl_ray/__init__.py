"""jdcl-ray: joint debiased representation learning and clustering of long-tailed images."""

__version__ = "0.1.0"
