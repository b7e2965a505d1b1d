"""VQ-VAE models built on vqfast's quantizers.

    SimpleVQVAE       conv encoder -> VectorQuantizer -> conv decoder (seeds 000/001/003/004)
    ImprovedVQVAE     the same with a ResidualVectorQuantizer (seed 002)
    MultiScaleVQVAE   VAR's multi-scale residual tokenizer (shared codebook, phi convolutions)
"""
from vqfast.models.multiscale import MultiScaleVQVAE, Phi
from vqfast.models.simple import ImprovedVQVAE, SimpleVQVAE

__all__ = ["SimpleVQVAE", "ImprovedVQVAE", "MultiScaleVQVAE", "Phi"]
