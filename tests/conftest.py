"""Shared test set-up."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tests use tiny tensors: one thread is faster than two, and much faster on busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def killer_plugin(tmp_path):
    """``killer_plugin(name)``: the path of an init plug-in registering ``name``, an initializer
    that SIGKILLs the worker process running it, once (a marker file remembers), and never in
    this test process: a worker lost to the out-of-memory killer."""
    def make(name: str) -> Path:
        plugin = tmp_path / f"{name}.py"
        plugin.write_text(
            "import os, signal\n"
            "from pathlib import Path\n"
            "import torch\n"
            "from awd_nonnormal.init import register\n"
            f"MARK = Path({str(tmp_path / 'killed')!r})\n"
            f"DRIVER = {os.getpid()}\n\n"
            f"@register({name!r}, gain='scale', override=True)\n"
            "def killer_(w, scale: float = 1.0):\n"
            "    if os.getpid() != DRIVER and not MARK.exists():\n"
            "        MARK.write_text('killed')\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    with torch.no_grad():\n"
            "        return torch.nn.init.orthogonal_(w, gain=scale)\n")
        return plugin
    return make
