import sys

import pytest

from helpers import run_python

FRAGMENTING = """
import os, sys, threading, torch
from simpo_lightning.callbacks import return_freed_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def returned(on: bool) -> float:
    if on:
        assert return_freed_memory(1)
    kept, freed_later = [], []
    def work():  # tensors of varying size from another thread (as the autograd engine's), small ones kept between them
        for i in range(400):
            t = torch.ones(2**18 * (1 + i % 7))  # 1 to 7 MiB
            if i % 2:
                freed_later.append(t)
            kept.append(torch.ones(2**14))  # 64 KiB
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    before = rss()
    freed_later.clear()
    return before - rss()
for on in (False, True):  # each in a fresh child of this one process, which imported torch once
    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, f"{returned(on)}\\n".encode())
        os._exit(0)
    os.wait()
    print(os.read(read, 64).decode().strip())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_return_freed_memory_gives_freed_tensors_back_to_the_os(tmp_path):
    """About 800 MiB of tensors are freed; glibc's default keeps nearly all of it resident."""
    result = run_python(FRAGMENTING, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    default, on = map(float, out.split())
    assert on > 700 and default < 300, (default, on)
