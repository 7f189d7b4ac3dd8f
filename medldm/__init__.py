"""medldm: 3D brain-MRI latent diffusion toolkit."""

__version__ = "0.1.0"
