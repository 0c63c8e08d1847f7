"""nnunet-topo: topology-aware training, meshes and topology metrics for nnU-Net v2."""

__version__ = "0.1.0"
