from __future__ import annotations

import pytest

from moe_course.experts import FeedForward
from moe_course.show import show_source


def test_show_source_prints_the_package_code_outside_jupyter(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ipython(name, *args, **kwargs):
        if name.startswith("IPython"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ipython)
    show_source(FeedForward.forward)
    out = capsys.readouterr().out
    assert out.startswith("# moe_course.experts.FeedForward.forward") and "def forward" in out


def test_show_source_line_range(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "IPython.display", None)
    show_source(FeedForward.forward, lines=(1, 1))
    assert capsys.readouterr().out.strip().splitlines()[1].strip().startswith("def forward")


def test_show_source_refuses_builtins():
    with pytest.raises(ValueError, match="cannot show the source"):
        show_source(len)
