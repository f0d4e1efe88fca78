"""Measurements of trained models: who learned what, and where the patients went.

metrics         accuracy_by_group(), gradient_agreement(): accuracy per group, how much patients' gradients agree
specialisation  gate_mass_by_specialty(), specialisation_score(): did the experts specialise? (lessons 03-04)
load            LoadTracker, evaluate_capacity(), batch_loads(), max_over_mean_load(): the experts' load and the dropped patients
lm_routing      routing_report(), RoutingTracker: which expert gets which characters, per layer (lesson 08)
"""

from .lm_routing import LayerRouting, RoutingTracker, routing_report
from .load import LoadTracker, batch_loads, evaluate_capacity, load_stats, max_over_mean_load, overflow_share
from .metrics import AgreementTracker, accuracy_by_group, gradient_agreement, gradient_cosines
from .specialisation import (
    SpecialisationTracker,
    effective_experts,
    gate_mass_by_specialty,
    normalized_mutual_information,
    seen_by_specialty,
    specialisation_score,
)

__all__ = [
    "LayerRouting",
    "RoutingTracker",
    "routing_report",
    "LoadTracker",
    "batch_loads",
    "evaluate_capacity",
    "load_stats",
    "max_over_mean_load",
    "overflow_share",
    "AgreementTracker",
    "accuracy_by_group",
    "gradient_agreement",
    "gradient_cosines",
    "SpecialisationTracker",
    "effective_experts",
    "gate_mass_by_specialty",
    "normalized_mutual_information",
    "seen_by_specialty",
    "specialisation_score",
]
