"""Other MoE designs, built on the core and compared with its Switch layer (lesson 09).

    soft_moe   SoftMoE: no token is sent anywhere; every expert sees a few "slots", each a weighted
               average of all the tokens (Puigcerver et al. 2023, arXiv:2308.00951)
    adaptive   top_p_routing(), null_expert_routing(), AdaptiveMoE: tokens get different amounts of
               compute (Huang et al. 2024, arXiv:2403.07652; Zeng et al. 2024, arXiv:2406.13233)

Here are the main names; import the rest from the module. Neither needs a process group
(``moe_course.distributed`` spreads the core's own layer over processes).
"""

from .adaptive import AdaptiveMoE, AdaptiveMoEConfig, AdaptiveRouting, ClinicAdaptiveMoE, null_expert_routing, top_p_routing
from .soft_moe import ClinicSoftMoE, SoftMoE, SoftMoEConfig, influence_matrix, soft_moe

__all__ = [
    "AdaptiveMoE",
    "AdaptiveMoEConfig",
    "AdaptiveRouting",
    "ClinicAdaptiveMoE",
    "null_expert_routing",
    "top_p_routing",
    "ClinicSoftMoE",
    "SoftMoE",
    "SoftMoEConfig",
    "influence_matrix",
    "soft_moe",
]
