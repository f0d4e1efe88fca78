"""When the learner's code crashes: say where, and what the error means, in the learner's terms.

A raw PyTorch error ("mat1 and mat2 shapes cannot be multiplied (5x8 and 32x8)")
names shapes but not the learner's variables. ``explain`` finds the line of the
learner's code that raised, translates the usual PyTorch and Python errors into
words, and names the arguments whose shapes appear in the error (``w_in``
transposed, say). It returns the message and whether the error was recognised.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_PACKAGE = str(Path(__file__).resolve().parents[1])  # moe_course/: the course's own code, not the learner's
_LIBRARY = ("site-packages", "dist-packages", "/torch/", "<frozen", "/lib/python")


def _is_learners(filename: str) -> bool:
    if filename.startswith(_PACKAGE) or any(part in filename for part in _LIBRARY):
        return False
    return True


def raised_by_learner(err: NotImplementedError) -> bool:
    """Is this NotImplementedError the learner's stub, not torch saying an op does not exist for a dtype?"""
    frames = traceback.extract_tb(err.__traceback__)
    line = (frames[-1].line or "").strip() if frames else ""
    if line.startswith("raise") or str(err).startswith("Exercise "):
        return True
    return not re.search(r"not implemented for '\w+'", str(err))


def learner_line(err: BaseException) -> str:
    """' in `code` (line k)' for the last frame of the learner's own code, or ''."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if _is_learners(f.filename)]
    if not frames:
        return ""
    frame = frames[-1]
    code = (frame.line or "").strip()
    if not code:
        return f" (line {frame.lineno} of your function)"
    code = code if len(code) <= 90 else code[:87] + "…"
    return f" in `{code}`"


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"-?\d+", text))


class Arguments:
    """The learner's arguments by name, to say which one has a shape that shows up in an error."""

    def __init__(self, names: Sequence[str], values: Sequence[Any], code: str = "") -> None:
        self.items = [(n, v) for n, v in zip(names, values)]
        self.code = code  # the learner's line, to tell `w` from `w.T` when both shapes fit

    def who(self, shape: tuple[int, ...]) -> str:
        exact = [n for n, v in self.items if isinstance(v, torch.Tensor) and tuple(v.shape) == shape]
        flipped = [
            n
            for n, v in self.items
            if isinstance(v, torch.Tensor) and v.ndim == 2 and tuple(v.shape)[::-1] == shape and tuple(v.shape) != shape
        ]
        written = [n for n in flipped if re.search(rf"\b{re.escape(n)}\s*\.\s*(?:T\b|mT\b|t\(|transpose)", self.code)]
        if len(written) == 1:
            return f"`{written[0]}` transposed"
        if len(exact) == 1:
            return f"`{exact[0]}`"
        if len(flipped) == 1:
            return f"`{flipped[0]}` transposed"
        return ""

    def shown(self) -> str:
        parts = []
        for name, v in self.items:
            if isinstance(v, torch.Tensor):
                dtype = "" if v.dtype == torch.float32 else f" {str(v.dtype).replace('torch.', '')}"
                parts.append(f"{name} {tuple(v.shape)}{dtype}")
            elif isinstance(v, (int, float, bool)):
                parts.append(f"{name}={v!r}")
            else:
                parts.append(f"{name}: {type(v).__name__}")
        return ", ".join(parts)


def _matmul(m: re.Match, a: Arguments) -> str:
    left, right = (int(m.group(1)), int(m.group(2))), (int(m.group(3)), int(m.group(4)))
    said = f"a matrix product (@ or torch.matmul) got shapes {left} and {right}: the left side's last size ({left[1]}) must equal the right side's first ({right[0]})."
    names = [f"{shape} is {who}" for shape, who in ((left, a.who(left)), (right, a.who(right))) if who]
    if any("transposed" in n for n in names):
        names.append("drop the .T (or transpose the other side): the weights already have the shape (inputs, outputs)")
    elif left[1] == right[1] or left[0] == right[0]:
        names.append("one side needs a transpose (.T, or .transpose(-2, -1)), or the operands are in the wrong order")
    return said + (" " + "; ".join(names) + "." if names else "")


def _broadcast(m: re.Match, a: Arguments) -> str:
    x, y, dim = m.group(1), m.group(2), m.group(3)
    return (
        f"two tensors combined entry by entry (+, -, *, / or a comparison) have sizes {x} and {y} in dimension {dim}, "
        "which cannot broadcast. Check the shapes of both sides: is one of them transposed, summed over the wrong "
        "axis, or missing a keepdim=True / [:, None]?"
    )


def _dim_range(m: re.Match, a: Arguments) -> str:
    low, high, got = int(m.group(1)), int(m.group(2)), int(m.group(3))
    ndim = high + 1
    return (
        f"dim={got} does not exist on a tensor with {ndim} dimension{'s' if ndim != 1 else ''} "
        f"(valid: {low} to {high}). Which axis did you mean? Count the dimensions of the tensor you reduce."
    )


def _index_bounds(m: re.Match, a: Arguments) -> str:
    idx, dim, size = m.group(1), m.group(2), int(m.group(3))
    return (
        f"index {idx} is out of range for dimension {dim} of size {size} (indices run from 0 to {size - 1}). "
        "A loop one step too far, an id used as an index into the wrong tensor, or a size taken from the wrong argument?"
    )


def _reshape(m: re.Match, a: Arguments) -> str:
    return (
        f"a reshape/view to [{m.group(1)}] does not fit a tensor of {m.group(2)} entries: the sizes you asked for "
        "do not multiply to the number of entries. Take the sizes from the tensor itself (x.shape) rather than from another argument."
    )


def _dtype(m: re.Match, a: Arguments) -> str:
    return (
        "two tensors of different dtypes met (e.g. an integer and a float tensor in one matmul or index_add): "
        "convert one with .float() or .long() so both agree. Counts are integers; weights and probabilities are floats."
    )


def _cast(m: re.Match, a: Arguments) -> str:
    return (
        f"a {m.group(1)} result was written into a {m.group(2)} tensor (an in-place op or out= on an integer tensor): "
        "make the tensor you write into a float tensor (e.g. torch.zeros(..., dtype=torch.float)) or divide out of place."
    )


def _ambiguous(m: re.Match, a: Arguments) -> str:
    return (
        "a tensor with several entries was used as a True/False (in `if`, `and`, `or` or `while`). Python cannot decide "
        "for all entries at once: use .any() / .all(), or compute entry by entry with torch.where or a mask."
    )


def _index_dtype(m: re.Match, a: Arguments) -> str:
    return (
        "a float tensor was used as an index. Indices must be integers (int64) or a bool mask: use .long(), or "
        "keep ids as integer tensors (argmax, topk indices and bincount already are)."
    )


def _inplace_grad(m: re.Match, a: Arguments) -> str:
    return (
        "a tensor autograd needs was changed in place (+=, .add_(), x[...] = ...). Compute a new tensor instead, "
        "e.g. y = y + z rather than y += z."
    )


def _numpy_grad(m: re.Match, a: Arguments) -> str:
    return "you called .numpy() on a tensor that carries gradients: stay in torch (no NumPy needed here)."


def _bincount(m: re.Match, a: Arguments) -> str:
    return "torch.bincount needs a 1-D tensor of non-negative integers; did you pass floats, a 2-D tensor, or probabilities instead of ids?"


def _not_for_dtype(m: re.Match, a: Arguments) -> str:
    return (
        f"this operation does not accept {m.group(1)} tensors: convert the input first (.long() for ids and counts, "
        ".float() for values), or use another operation."
    )


def _expand(m: re.Match, a: Arguments) -> str:
    return (
        f"sizes {m.group(2)} and {m.group(1)} meet in dimension {m.group(3)} of an assignment or expand: the value you "
        "write does not fit the slot you write it into. Compare the shapes of both sides."
    )


def _inplace_broadcast(m: re.Match, a: Arguments) -> str:
    return (
        f"an in-place operation on a tensor of shape [{m.group(1)}] would need shape [{m.group(2)}]. "
        "In-place ops (+=, .add_()) cannot grow a tensor: compute a new one (y = y + z)."
    )


def _too_many_indices(m: re.Match, a: Arguments) -> str:
    return f"you indexed a {m.group(1)}-dimensional tensor with more indices than it has dimensions: check its shape."


def _stack(m: re.Match, a: Arguments) -> str:
    return (
        f"torch.stack got tensors of different shapes, [{m.group(1)}] and [{m.group(3)}]: every piece must have the same "
        "shape (an empty group gives a different shape: handle it, or build the result with one vectorised operation)."
    )


def _cat(m: re.Match, a: Arguments) -> str:
    return "torch.cat got pieces whose sizes differ outside the joined dimension: check their shapes and the dim you join along."


def _topk(m: re.Match, a: Arguments) -> str:
    return (
        "torch.topk was asked for more entries than the dimension has: is the dim right (the experts are the last "
        "dimension, dim=-1) and is k the right number?"
    )


def _gather(m: re.Match, a: Arguments) -> str:
    return "gather/scatter need an int64 index with as many dimensions as the input: use .long() and add the missing dims ([:, None])."


def _one_hot(m: re.Match, a: Arguments) -> str:
    return (
        "F.one_hot needs integer ids below num_classes: pass the ids (int64), not probabilities, and the right number of classes."
    )


def _no_grad(m: re.Match, a: Arguments) -> str:
    return (
        "backward found no gradient path: a result was detached (.detach(), .item(), torch.no_grad(), or built from "
        "integers only). Keep it a torch computation on the inputs."
    )


def _empty(m: re.Match, a: Arguments) -> str:
    return (
        "a reduction (max, argmax, min…) on an empty tensor: a group with no members (an expert with no tokens, "
        "a specialty with no patients). Handle the empty case, or use a vectorised operation that needs no special case."
    )


def _zero_division(m: re.Match, a: Arguments) -> str:
    return "a division by zero in Python numbers: an empty group? (A tensor division by 0 gives inf or NaN instead of an error.)"


def _operands(m: re.Match, a: Arguments) -> str:
    return (
        f"Python cannot apply {m.group(1)} to a {m.group(2)} and a {m.group(3)}: is one of them a list, None, or a "
        "function you forgot to call (missing parentheses)?"
    )


def _attribute(m: re.Match, a: Arguments) -> str:
    kind, attr = m.group(1), m.group(2)
    if kind in ("int", "float") and attr in ("shape", "size", "dim", "item", "float", "long", "sum", "mean"):
        return f"`.{attr}` was used on a Python {kind}: that value is a plain number here, not a tensor."
    if kind == "NoneType":
        return f"`.{attr}` was used on None: a function or method that returns nothing (e.g. an in-place op) was used as a value."
    return f"a {kind} has no attribute `{attr}`: a typo, or a value of another type than you thought."


def _signature(m: re.Match, a: Arguments) -> str:
    return (
        f"your function takes {m.group(1)} positional argument(s), but the check calls it with {m.group(2)}: "
        "keep the signature of the stub (the same arguments, in the same order)."
    )


def _keyword(m: re.Match, a: Arguments) -> str:
    return f"{m.group(1)}() has no argument `{m.group(2)}`: check its name in the documentation."


def _missing(m: re.Match, a: Arguments) -> str:
    return f"{m.group(1)}() is missing {m.group(2)} argument(s): keep the signature of the stub, and call functions with all their arguments."


def _name(m: re.Match, a: Arguments) -> str:
    return (
        f"the name `{m.group(1)}` is not defined inside your function. A variable from another cell? A missing "
        "import (torch, F)? Use only the function's arguments, and import what you need."
    )


def _index_shapes(m: re.Match, a: Arguments) -> str:
    return (
        f"index tensors used together have shapes {m.group(1)}: they must have the same length (one entry per item). "
        "An argmax or a sum over the wrong axis gives one value per expert (or class) instead of one per token?"
    )


def _list_index(m: re.Match, a: Arguments) -> str:
    return "a Python list was indexed with a tensor or a float: convert the index with int(...), or use a tensor instead of the list."


_CRASHES: list[tuple[re.Pattern, Callable[[re.Match, Arguments], str]]] = [
    (re.compile(p), f)
    for p, f in [
        (r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)", _matmul),
        (
            r"The size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\) at non-singleton dimension (\d+)",
            _broadcast,
        ),
        (r"Dimension out of range \(expected to be in range of \[(-?\d+), (-?\d+)\], but got (-?\d+)\)", _dim_range),
        (r"index (-?\d+) is out of bounds for dimension (\d+) with size (\d+)", _index_bounds),
        (r"shape '\[([-\d, ]*)\]' is invalid for input of size (\d+)", _reshape),
        (
            r"expected (?:scalar type \w+ but found \w+|m1 and m2 to have the same dtype|both vectors to have same dtype|mat1 and mat2 to have the same dtype)"
            r"|Index put requires the source and destination dtypes match|index_add_\(\): self \(\w+\) and source \(\w+\) must have the same scalar type"
            r"|expected \w+ and \w+ to have the same dtype|must have the same dtype",
            _dtype,
        ),
        (r"result type (\w+) can't be cast to the desired output type (\w+)", _cast),
        (r"Boolean value of Tensor with more than one (?:value|element) is ambiguous", _ambiguous),
        (
            r"tensors used as indices must be long, int|only integer tensors of a single element can be converted to an index"
            r"|index_add_\(\): Expected dtype int|Expected dtype int64 for index|IndexError: only integers, slices",
            _index_dtype,
        ),
        (r"modified by an inplace operation", _inplace_grad),
        (r"Can't call numpy\(\) on Tensor that requires grad", _numpy_grad),
        (r"bincount only supports 1-d non-negative integral inputs|bincount.*(?:Float|floating)", _bincount),
        (r"not implemented for '(\w+)'", _not_for_dtype),
        (
            r"The expanded size of the tensor \((\d+)\) must match the existing size \((\d+)\) at non-singleton dimension (\d+)",
            _expand,
        ),
        (r"output with shape \[([\d, ]*)\] doesn't match the broadcast shape \[([\d, ]*)\]", _inplace_broadcast),
        (r"too many indices for tensor of dimension (\d+)", _too_many_indices),
        (
            r"stack expects each tensor to be equal size, but got \[([\d, ]*)\] at entry (\d+) and \[([\d, ]*)\] at entry (\d+)",
            _stack,
        ),
        (r"Sizes of tensors must match except in dimension", _cat),
        (r"selected index k out of range|k \(\d+\) is too big", _topk),
        (r"Index tensor must have the same number of dimensions as input tensor|gather\(\): Expected dtype", _gather),
        (r"one_hot is only applicable to index tensor|Class values must be smaller than num_classes", _one_hot),
        (r"does not require grad and does not have a grad_fn", _no_grad),
        (
            r"Expected reduction dim to be specified for input\.numel\(\) == 0|on tensor with no elements|cannot perform reduction",
            _empty,
        ),
        (r"division by zero", _zero_division),
        (r"unsupported operand type\(s\) for (\S+?): '(\w+)' and '(\w+)'", _operands),
        (r"'(\w+)' object has no attribute '(\w+)'", _attribute),
        (r"takes (\d+) positional arguments? but (\d+) (?:was|were) given", _signature),
        (r"(\w+)\(\) got an unexpected keyword argument '(\w+)'", _keyword),
        (r"(\w+)\(\) missing (\d+) required positional argument", _missing),
        (r"name '(\w+)' is not defined", _name),
        (r"list indices must be integers", _list_index),
        (r"indexing tensors could not be broadcast together with shapes (.*)$", _index_shapes),
    ]
]


def explain(err: BaseException, names: Sequence[str], args: Sequence[Any]) -> tuple[str, bool]:
    """A message for a crash in the learner's code, and whether the error was recognised (named)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = learner_line(err)
    arguments = Arguments(names, args, where)
    if (
        ".T" in where
        and re.search(r"\.T\b", where)
        and any(isinstance(v, torch.Tensor) and v.ndim > 2 for _, v in arguments.items)
    ):
        return (
            f"your code raised {type(err).__name__}{where}: `.T` on a tensor with more than 2 dimensions reverses *all* of them "
            f"(B, H, T, d becomes d, T, H, B). To swap the last two, use .transpose(-2, -1) (or .mT).\n  It was called with "
            f"{arguments.shown()}."
        ), True
    for pattern, say in _CRASHES:
        m = pattern.search(str(err))
        if m:
            return (
                f"your code raised {type(err).__name__}{where}: {say(m, arguments)}\n  It was called with {arguments.shown()}.",
                True,
            )
    return f"your function raised {type(err).__name__}{where}: {text}\n  It was called with {arguments.shown()}.", False
