"""``sb-hf run [options] [--] script.py args...`` / ``sb-hf run [options] -m module args...``:
run an unmodified Python script with support-basis attention switched on for every supported
model it loads (the no-line form of ``sb_hf.apply_support_basis()``).

The script runs in this process as ``__main__`` with ``sys.argv`` set as if it had been started
directly, so ``accelerate launch -m sb_hf run -- train.py`` works per process too.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from ..config import add_settings_arguments, settings_from_arguments, settings_given
from ..integrations.plan import IMPLEMENTATIONS
from . import apply_support_basis, revert_support_basis


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="support_basis", choices=list(IMPLEMENTATIONS),
                        help="attention implementation to switch to (default support_basis)")
    add_settings_arguments(parser)
    parser.add_argument("--force", action="store_true",
                        help="also switch models the script loads with an explicit attn_implementation")
    parser.add_argument("-m", dest="module", default=None, help="run a module (as python -m) instead of a script")
    parser.add_argument("target", nargs="*", help="[--] script.py and its arguments (with -m: the module's arguments)")


def split_argv(parser: argparse.ArgumentParser, tokens: list[str]) -> tuple[list[str], list[str]]:
    """Split ``sb-hf run`` arguments into ours and the target's: ours end at ``--``, at the token
    after ``-m`` or at the first token that is not one of our options (the script), so the target's
    own options never reach our parser."""
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            return tokens[:i], tokens[i + 1 :]
        if token == "-m":
            return tokens[: i + 2], tokens[i + 2 :]
        if not token.startswith("-"):
            return tokens[:i], tokens[i:]
        i += 2 if (token in takes_value and "=" not in token) else 1
    return tokens, []


def run(args: argparse.Namespace) -> int:
    """Check the options, patch model loading, run the target; the target's own exceptions propagate
    with their traceback (as with ``python script.py``)."""
    try:
        return _run(args)
    except _UsageError as err:
        print(f"sb-hf run: error: {err}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    pass


def _run(args: argparse.Namespace) -> int:
    target = list(args.target)
    if args.module is None:
        if not target:
            raise _UsageError("give a script (sb-hf run [options] -- script.py args) or a module (-m module args)")
        script, script_args = target[0], target[1:]
        if not Path(script).is_file():
            raise _UsageError(f"no such script {script!r}")
    try:
        settings = settings_from_arguments(args) if settings_given(args) else None
    except (ValueError, FileNotFoundError) as err:
        raise _UsageError(str(err)) from None
    apply_support_basis(None, settings, method=args.method, force=args.force)
    saved_argv = sys.argv
    try:
        if args.module is not None:
            sys.argv = [args.module, *target]
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *script_args]
            sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script.py` does
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv
        revert_support_basis()
    return 0
