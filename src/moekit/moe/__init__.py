"""The MoE layer: routers, balancing, routed and shared experts, expert backends."""

from ..config import MoEConfig
from .balancing import update_expert_biases
from .layer import MoE, MoEAux
from .router import Router, Routing

__all__ = ["MoE", "MoEAux", "MoEConfig", "Router", "Routing", "update_expert_biases"]
