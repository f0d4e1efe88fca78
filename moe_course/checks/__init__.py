"""Hidden checks for the exercise notebooks: ``check("N.M", your_object)``.

The tests for each exercise live here, in the package, so the notebooks stay
short. A check prints one line when your answer is right and raises
``ExerciseError`` with a specific message when it is not.
"""

from . import (  # noqa: F401  (registers the checkers)
    lesson00,
    lesson01,
    lesson02,
    lesson03,
    lesson04,
    lesson05,
    lesson06,
    lesson07,  # noqa: F401  (attention and the transformer block)
    lesson08,  # noqa: F401  (the Switch Transformer)
    lesson09,  # noqa: F401  (beyond one machine: the exchange, Soft MoE, top-p)
    lesson10,  # noqa: F401  (modern MoE)
)
from ._core import REGISTRY, Exercise, ExerciseError, Mistake, check, exercise

__all__ = ["check", "ExerciseError", "Exercise", "Mistake", "exercise", "REGISTRY"]
