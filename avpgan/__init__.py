"""avpgan: distributed training of AVP-GAN voice portraits (voice -> face)."""

__version__ = "0.1.0"
