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
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "SIMPO_LIGHTNING_DEBUG"


class UserError(Exception):
    """A problem with the user's input, data, configuration or files, not with the code."""


def require(condition: bool, message: str) -> None:
    """A ``UserError`` with ``message`` unless ``condition``: for settings that cannot work (a negative β, a batch
    of no pairs), refused where they are given rather than failing, or silently misleading, later."""
    if not condition:
        raise UserError(message)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. jsonargparse's type errors span several lines (``Parser key "k":``,
    the accepted types, ``Given value: v``) and nest an error of a ``class_path`` section inside the
    section's own; they become ``section.k: got v; expected A or B``."""
    return _condense(str(error).strip())


def _condense(text: str) -> str:
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    lines = text.splitlines()
    nested = next((i for i, line in enumerate(lines) if "Problem with given class_path" in line), None)
    if key and nested is not None:  # the error inside the section's class: report that one, under the section
        indent = len(lines[nested]) - len(lines[nested].lstrip())
        inner = []
        for line in lines[nested + 1 :]:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            inner.append(line)
        message = _condense(textwrap.dedent("\n".join(inner)).strip())
        return (
            f"{key.group(1)}.{message}"
            if re.match(r"[\w.]+: ", message) and " " not in message.split(":")[0]
            else (f"{key.group(1)}: {message}")
        )
    if key:
        given = re.search(r"Given value: (.*)", text)
        expected = re.findall(r"- Expected a (.*)", text)
        if given and expected:
            types = " or ".join(map(_type_name, expected))
            return f"{key.group(1)}: got {given.group(1)!r}; expected {types} (see --help)"
        single = re.match(r"Expected a (.*?)\. Got value: (.*)", key.group(2).strip())
        if single:
            return f"{key.group(1)}: got {single.group(2)!r}; expected {_type_name(single.group(1))} (see --help)"
        text = f"{key.group(1)}: {key.group(2)}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _type_name(text: str) -> str:
    """``typing.Literal['a', 'b']`` as ``one of 'a', 'b'``, ``<class 'NoneType'>`` as ``null``, ``<class 'int'>``
    as ``int``."""
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
    except Exception as error:
        cause = user_error_in(error)
        if os.environ.get(DEBUG_ENV) or cause is None:
            raise
        rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
        where = f" (process {rank})" if rank != "0" else ""
        if isinstance(cause, RuntimeError):
            message = "another process of this run stopped (its error is above or in its log), so this one stops too"
        else:
            message = one_line(cause)
        print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def user_error_in(error: BaseException) -> BaseException | None:
    """The user error behind ``error``: itself, or one it was raised from (jsonargparse wraps what a class
    raises while it instantiates it from the configuration); a collective broken by another process's end
    counts too. None for anything else: a bug."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (UserError, argparse.ArgumentError)):
            return error
        if isinstance(error, RuntimeError) and peer_gone(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def peer_gone(error: RuntimeError) -> bool:
    """A collective that failed because another process of the run ended (gloo and NCCL say so in words)."""
    import torch.distributed as dist

    gone = re.search(
        r"[Cc]onnection (closed|reset) by peer|remote worker crashing|NCCL communicator was aborted", str(error)
    )
    return bool(gone) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
