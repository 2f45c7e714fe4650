"""Errors in what the user gave (data, configuration, paths), reported as one line.

The command prints a ``UserError`` or a configuration error as ``simpo-lightning: error: <message>``
and exits with status 2, without a traceback; the message says what is wrong, where, and what to
do. Any other exception is a bug and keeps its traceback. ``SIMPO_LIGHTNING_DEBUG=1`` shows the
traceback of user errors too.
"""

import argparse
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator

DEBUG_ENV = "SIMPO_LIGHTNING_DEBUG"


class UserError(Exception):
    """A problem with the user's input, data, configuration or files, not with the code."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. jsonargparse's type errors span several lines
    (``Parser key "k":``, the accepted types, ``Given value: v``); they become
    ``k: got v; expected A or B``."""
    text = str(error).strip()
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if key:
        given = re.search(r"Given value: (.*)", text)
        expected = re.findall(r"- Expected a (.*)", text)
        if given and expected:
            return f"{key.group(1)}: got {given.group(1)!r}; expected {' or '.join(map(_type_name, expected))} (see --help)"
        text = f"{key.group(1)}: {key.group(2)}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _type_name(text: str) -> str:
    """``typing.Literal['a', 'b']`` as ``one of 'a', 'b'``, ``<class 'NoneType'>`` as ``null``, ``<class 'int'>`` as ``int``."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    name = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    return "null" if name == "NoneType" else name


@contextmanager
def reported(prog: str = "simpo-lightning") -> Iterator[None]:
    """Turns user errors raised inside into one line on stderr and exit status 2."""
    try:
        yield
    except (UserError, argparse.ArgumentError, RuntimeError) as error:
        if os.environ.get(DEBUG_ENV) or (isinstance(error, RuntimeError) and not peer_gone(error)):
            raise
        rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
        where = f" (process {rank})" if rank != "0" else ""
        message = ("another process of this run stopped (its error is above or in its log), so this one stops too"
                   if isinstance(error, RuntimeError) else one_line(error))
        print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def peer_gone(error: RuntimeError) -> bool:
    """A collective that failed because another process of the run ended (gloo and NCCL say so in words)."""
    import torch.distributed as dist

    gone = re.search(r"[Cc]onnection (closed|reset) by peer|remote worker crashing|NCCL communicator was aborted", str(error))
    return bool(gone) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

