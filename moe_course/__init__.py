"""moe_course: the tested building blocks of the Mixture-of-Experts course.

Experts are doctors; the router is the GP who sends each patient to the right
specialist. Modules, in reading order:

    device     get_device(), seed_everything()
    clinic     make_clinic(): patients from several specialties (lessons 01-05)
    experts    FeedForward: one doctor, the transformer's MLP block
    flops      count_parameters(), ffn_param_count(), ffn_flops()
    metrics    accuracy_by_group()
    training   train(), TrainConfig, ClassificationTask
    plots      figures the lessons share
    show       show_source(): read the package's code inside a lesson
    checks     check("N.M", answer): the hidden tests of the exercises
    exercises  `moe-exercises build`: exercises/ generated from solutions/

Shape legend, used everywhere: B batch, T time, D model width, F hidden width,
E experts, K top-k, C capacity, N = B·T tokens.
"""

from .device import get_device, seed_everything

__version__ = "0.1.0"
__all__ = ["get_device", "seed_everything", "__version__"]
