"""Other MoE designs, built on the core and compared with its Switch layer (lesson 09).

    soft_moe   SoftMoE: no token is sent anywhere; every expert sees a few "slots", each a weighted
               average of all the tokens (Puigcerver et al. 2023, arXiv:2308.00951)
    adaptive   top_p_routing(), null_expert_routing(), AdaptiveMoE: tokens get different amounts of
               compute (Huang et al. 2024, arXiv:2403.07652; Zeng et al. 2024, arXiv:2406.13233)

They need no process group (``moe_course.distributed`` spreads the core's own layer over processes).
"""

from .adaptive import (
    ADAPTIVE_ROUTERS,
    AdaptiveMoE,
    AdaptiveMoEConfig,
    AdaptiveMoEOutput,
    AdaptiveRouting,
    ClinicAdaptiveMoE,
    ClinicAdaptiveOutput,
    adaptive_balance_loss,
    blur_referrals,
    compute_by_group,
    null_expert_routing,
    router_entropy,
    top_p_routing,
)
from .soft_moe import (
    ClinicSoftMoE,
    ClinicSoftMoEOutput,
    SoftMoE,
    SoftMoEConfig,
    SoftMoEOutput,
    influence_matrix,
    soft_moe,
    soft_moe_flops_per_token,
    soft_moe_logits,
    soft_moe_weights,
)

__all__ = ["ADAPTIVE_ROUTERS", "AdaptiveMoE", "AdaptiveMoEConfig", "AdaptiveMoEOutput", "AdaptiveRouting", "ClinicAdaptiveMoE",
           "ClinicAdaptiveOutput", "adaptive_balance_loss", "blur_referrals", "compute_by_group", "null_expert_routing",
           "router_entropy", "top_p_routing", "ClinicSoftMoE", "ClinicSoftMoEOutput", "SoftMoE", "SoftMoEConfig", "SoftMoEOutput",
           "influence_matrix", "soft_moe", "soft_moe_flops_per_token", "soft_moe_logits", "soft_moe_weights"]
