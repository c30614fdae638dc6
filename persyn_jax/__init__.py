"""persyn_jax: PerSyn (Route then Generate, arXiv 2510.10925) in JAX."""
__version__ = "0.1.0"
