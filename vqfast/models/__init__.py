"""VQ-VAE models built on vqfast's quantizers.

    SimpleVQVAE          conv encoder -> VectorQuantizer -> conv decoder (seeds 000/001/003/004)
    ImprovedVQVAE        the same with a ResidualVectorQuantizer (seed 002)
    VQVAE                VAR's multi-scale tokenizer: VAR's constructor, modules and state_dict keys
    MultiScaleQuantizer  its quantizer: VAR's VectorQuantizer2 with vqfast's codebook options

    vqvae_config_from_state_dict(sd)   the VQVAE constructor arguments of a bare VAR state_dict
"""
from vqfast.models.multiscale import MultiScaleQuantizer
from vqfast.models.simple import ImprovedVQVAE, SimpleVQVAE
from vqfast.models.vqvae import VQVAE, vqvae_config_from_state_dict

__all__ = ["SimpleVQVAE", "ImprovedVQVAE", "VQVAE", "MultiScaleQuantizer", "vqvae_config_from_state_dict"]
