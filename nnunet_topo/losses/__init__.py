"""Topology losses. One concept per file; each loss is an ``nn.Module`` with a functional twin."""
from nnunet_topo.losses.betti import BettiPriorLoss, betti_prior_loss
from nnunet_topo.losses.combined import TopologyLossWrapper
from nnunet_topo.losses.projected_pooling import ProjectedPoolingLoss, projected_pooling_loss

__all__ = ["BettiPriorLoss", "betti_prior_loss", "TopologyLossWrapper", "ProjectedPoolingLoss", "projected_pooling_loss"]
