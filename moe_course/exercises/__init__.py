"""Exercise notebooks generated from the solutions: ``python -m moe_course.exercises build``."""

from .build import BuildError, build, exercise_notebook, fingerprint, status, stub_source

__all__ = ["BuildError", "build", "exercise_notebook", "fingerprint", "status", "stub_source"]
