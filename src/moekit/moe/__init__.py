"""The MoE layer: routers, balancing, routed and shared experts, expert kernels."""

from .config import MoEConfig
from .layer import MoE, MoEAux, update_expert_biases
from .router import ROUTERS, Router, Routing, register_router

__all__ = ["MoE", "MoEAux", "MoEConfig", "ROUTERS", "Router", "Routing", "register_router", "update_expert_biases"]
