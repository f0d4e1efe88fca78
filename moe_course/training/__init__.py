"""Training: one loop for every model of the course, the language-model task, and the ``moe-train`` command.

    loop       train(), train_step(), make_optimizer(), TrainConfig, TrainResult, ClassificationTask, model_logits(), evaluating(), load_checkpoint()
    lm         LMTask: next-character loss, held-out loss and exact answers per domain; complete()
    bias       update_expert_biases_(): after a step, move the sigmoid router's selection bias by the load (lesson 10)
    cli        ``moe-train`` (or ``python -m moe_course.train``): train a language model from the shell

``from moe_course.training import train, TrainConfig`` is the short way in.
"""

from .bias import update_expert_biases_
from .lm import LMEvaluation, LMTask, complete, evaluate_lm
from .loop import (
    CLINIC_LR,
    ClassificationTask,
    Task,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    evaluating,
    load_checkpoint,
    make_optimizer,
    model_logits,
    train,
    train_step,
)

__all__ = [
    "CLINIC_LR",
    "TrainConfig",
    "TrainResult",
    "Task",
    "ClassificationTask",
    "train",
    "train_step",
    "make_optimizer",
    "model_logits",
    "evaluating",
    "load_checkpoint",
    "TrainingInterrupted",
    "LMTask",
    "LMEvaluation",
    "evaluate_lm",
    "complete",
    "update_expert_biases_",
]
