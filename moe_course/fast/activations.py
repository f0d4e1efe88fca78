"""Every activation the experts may use, with its derivative, for the hand-written backwards.

``ACTIVATION_GRADS[name] = (act, backward)`` where ``backward(grad, pre)`` is
grad · act'(pre). A test checks that every name in ``moe_course.experts.ACTIVATIONS``
is here, with the same forward and the derivative autograd gives. An activation
missing here is not wrong, only slower: ``flag.applies`` is then False and the
readable dispatch runs instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]
Backward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _gelu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, pre)


def _relu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(grad, pre, 0)


ACTIVATION_GRADS: dict[str, tuple[Activation, Backward]] = {
    "gelu": (F.gelu, _gelu_backward),
    "relu": (F.relu, _relu_backward),
}
