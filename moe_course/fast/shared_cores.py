"""Sharing the cores: how an MoE layer runs while other programs keep the cores busy.

An MoE layer is many small operations (a few per expert, and the router's
around them). With T intra-op threads each of them is split T ways, and all
T threads wait for each other at its end. On a quiet machine that wait is
short. On a busy laptop (a browser, a notebook kernel, a second training run)
another program holds one of the cores, the thread parked behind it finishes
its share a scheduler time slice late, and the layer pays that wait at every
small operation. A dense layer has a handful of big operations, so it loses
far less. (Measure it: ``python -m moe_course.bench --busy 2`` times the
layer and its dense twin with two spinning processes, side by side with the
quiet machine; before this module the default layer fell behind the masks loop there.)

So, when the cores are shared (``busy()``), the layer runs differently:

- every operation of the layer runs on one intra-op thread: no operation waits
  for a parked thread (``one_thread_when_busy`` on ``MoELayer.forward``; the
  forward, and the backward from the moment the gradient reaches the layer's
  output until it leaves through its input);
- the experts still use the T cores the caller asked for, as T one-thread
  workers taking the next expert off a queue (``threads.over_experts``): a
  parked worker delays only its own expert, the others take the rest.

Half measures lost when measured the same way: the experts alone on one
thread, with the router, softmax and gathers around them on two; or the
whole layer on one thread, experts included. The arrangement changes, the
arithmetic does not: every expert computes the same products on the same rows
either way (the tests pin ``contention(True/False)`` and compare outputs and
gradients).

The signal is the kernel's count of tasks running or ready to run right now
(the fourth field of ``/proc/loadavg`` on Linux; elsewhere the one-minute load
average, or nothing). It is a snapshot, read once per forward and once per
backward of a layer (one small file read), so it follows the machine from one call to
the next; a wrong guess costs one call some speed, never a different number.
``contention(True/False)`` pins the answer (tests, benchmarks);
``contention(None)`` goes back to reading it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from . import flag
from .flag import contention  # noqa: F401  (the switch lives with the fast path's other ones)

__all__ = ["runnable_tasks", "core_count", "contended", "busy", "sharing", "fitted_threads", "one_thread_when_busy", "contention"]

_scope = threading.local()  # .threads: the caller's intra-op thread count while a busy scope runs on one


def runnable_tasks() -> int | None:
    """Tasks (threads of every program, this one's included) running or waiting for a core right now; None if unknown.

    Linux: the fourth field of /proc/loadavg ("3/412": 3 runnable of 412).
    Elsewhere: the one-minute load average rounded (it lags), or None where
    there is none (Windows).
    """
    try:
        with open("/proc/loadavg", "rb") as fh:
            return int(fh.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def core_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def contended(runnable: int | None, cores: int, threads: int) -> bool:
    """Whether work split over ``threads`` intra-op threads would wait for cores other programs hold.

    runnable: tasks running or ready right now, this process's included (at
    most ``threads`` of them are ours: the caller and its intra-op workers).
    So at least runnable - threads belong to others, and our threads all get
    a core only if (runnable - threads) + threads <= cores. With one thread
    there is nothing to wait for; an unknown load counts as quiet.
    """
    return threads > 1 and runnable is not None and runnable > cores


def busy(threads: int | None = None) -> bool:
    """``contended`` for this machine now, on ``threads`` (default: torch's intra-op count); pinned by ``contention``."""
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1 or not flag.ENABLED:
        return False
    if flag.CONTENTION is not None:
        return flag.CONTENTION
    return contended(runnable_tasks(), core_count(), threads)


def sharing() -> int | None:
    """Inside a busy scope: the caller's thread count, for the expert workers (the scope runs on one); else None."""
    return getattr(_scope, "threads", None)


def _enter() -> int | None:
    """Start a busy scope on this thread if the machine is busy: one intra-op thread; returns the count to restore."""
    threads = torch.get_num_threads()
    if sharing() is not None or not busy(threads):
        return None
    _scope.threads = threads
    torch.set_num_threads(1)
    return threads


def _leave(threads: int | None) -> None:
    if threads is not None:
        _scope.threads = None
        torch.set_num_threads(threads)


@contextmanager
def fitted_threads() -> Iterator[None]:
    """``with fitted_threads():`` a busy scope inside if the machine is ``busy()`` (one intra-op thread, see
    ``sharing``), else nothing changes; the caller's thread count is restored afterwards (also on errors)."""
    threads = _enter()
    try:
        yield
    finally:
        _leave(threads)


class _BackwardScope:
    """One layer's backward as a busy scope: entered where the gradient reaches the layer, left where it leaves."""

    __slots__ = ("threads",)

    def __init__(self) -> None:
        self.threads: int | None = None

    def enter(self) -> None:
        if self.threads is None:
            self.threads = _enter()
            if self.threads is not None:
                # Normally left when the gradient leaves through the layer's input (_BackwardEnds); but a
                # backward may never get there (autograd.grad asked only for the experts' weights, or x needs
                # no gradient), and the caller's thread count must come back anyway. PyTorch has no public
                # "this backward pass is over" hook; queue_callback (private, but what torch's own FSDP and
                # DDP use for the same purpose) runs `leave` when the engine finishes this pass. Leaving
                # twice is harmless (`leave` clears the count).
                torch.autograd.Variable._execution_engine.queue_callback(self.leave)

    def leave(self) -> None:
        threads, self.threads = self.threads, None
        _leave(threads)


class _BackwardStarts(torch.autograd.Function):
    """Identity on the layer's output; its backward, the layer's first, enters the scope."""

    @staticmethod
    def forward(ctx, y, scope):
        ctx.scope = scope
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.scope.enter()
        return grad, None


class _BackwardEnds(torch.autograd.Function):
    """Identity on the layer's input; its backward runs once every gradient inside the layer is done, and leaves the scope."""

    @staticmethod
    def forward(ctx, x, scope):
        ctx.scope = scope
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.scope.leave()
        return grad, None


def one_thread_when_busy(forward: Callable) -> Callable:
    """Decorator of a layer's ``forward(module, x)`` whose result has a tensor ``y`` (``MoEOutput``).

    On a busy machine (``busy()``, asked once for the forward and once when
    the backward reaches the layer) the layer is a busy scope: its forward,
    and its backward between its output and its input, run on one intra-op
    thread, and its experts on the caller's thread count of one-thread
    workers. Outside the layer nothing changes, and the caller's thread count
    is always restored. With one thread, or the fast path off, it is the
    plain forward.
    """

    @functools.wraps(forward)
    def run(module, x, *args, **kwargs):
        if torch.get_num_threads() <= 1 or not flag.ENABLED or sharing() is not None:
            return forward(module, x, *args, **kwargs)
        scope = _BackwardScope()
        recording = torch.is_grad_enabled()
        if recording and isinstance(x, torch.Tensor) and x.requires_grad:
            x = _BackwardEnds.apply(x, scope)
        with fitted_threads():
            out = forward(module, x, *args, **kwargs)
        if recording and out.y.requires_grad:
            out = dataclasses.replace(out, y=_BackwardStarts.apply(out.y, scope))
        return out

    return run
