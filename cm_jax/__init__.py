"""cm_jax: Consistency Models (Song et al. 2023) in JAX/Flax."""
