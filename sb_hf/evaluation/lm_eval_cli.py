"""``sb-hf lm-eval``: lm-eval's own command line with the sb-hf backends registered, ``--sb-*`` settings, and
``eval/tasks`` on the include path; and ``python -m sb_hf.evaluation`` (``eval`` or ``lm-eval``)."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

from ..config import add_settings_arguments, settings_given
from .runner import add_eval_arguments, load_settings, run_eval
from .tasks import quiet_lm_eval_logs, require_lm_eval, tasks_dir


_LM_EVAL_SETTINGS: dict[str, Any] = {}


def _sb_settings_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_settings_arguments(parser, prefix="sb-")
    return parser


def patch_hflm() -> None:
    """Two fixes to lm-eval's ``hf`` model, applied in this process only:

    - settings given with ``--sb-*`` are applied to a model loaded with an sb-hf ``attn_implementation``;
    - under ``accelerate launch`` on CPU, HFLM splits the data only when CUDA devices > 1 (it checks
      ``torch.cuda.device_count()``), so every process would evaluate every question; here each
      process gets its rank's share, as on GPUs.
    """
    from lm_eval.models.huggingface import HFLM

    if getattr(HFLM.__init__, "_sb_hf_patched", False):
        return
    original = HFLM.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from sb_hf.patches import apply_support_basis
        from sb_hf.integrations.plan import IMPLEMENTATIONS

        model = getattr(self, "_model", None)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if _LM_EVAL_SETTINGS and impl in IMPLEMENTATIONS:
            apply_support_basis(model, _LM_EVAL_SETTINGS, method=impl)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1 \
                and accelerator.device.type == "cpu":
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    __init__._sb_hf_patched = True
    HFLM.__init__ = __init__


def run_lm_eval(argv: list[str] | None = None) -> int:
    """``sb-hf lm-eval ARGS``: lm-eval's command line with the sb-hf backends registered and
    ``eval/tasks`` added as ``--include_path`` when none is given. Extra options (taken out before
    lm-eval parses the rest): ``--sb-config FILE``, ``--sb-threshold``, ``--sb-degree``,
    ``--sb-sinks``, ``--sb-local-window``: settings for a model loaded with an sb-hf implementation."""
    require_lm_eval()
    import sb_hf  # noqa: F401  (registers support_basis, as23 and sink_window)

    argv = list(sys.argv[1:] if argv is None else argv)
    sb_args, rest = _sb_settings_arguments().parse_known_args(argv)
    _LM_EVAL_SETTINGS.clear()
    if settings_given(sb_args):
        _LM_EVAL_SETTINGS.update(load_settings(sb_args))
    if rest and rest[0] not in ("run", "ls", "validate", "-h", "--help"):
        rest = ["run", *rest]  # lm-eval's legacy form: no subcommand means `run`
    if rest[:1] in (["run"], ["ls"], ["validate"]) and not any(
            a == "--include_path" or a.startswith("--include_path=") for a in rest):
        try:
            rest += ["--include_path", str(tasks_dir())]
        except FileNotFoundError:
            pass  # a non-editable install without eval/tasks: lm-eval's own tasks only
    patch_hflm()
    quiet_lm_eval_logs()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *rest]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse --help / usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sb_hf.evaluation eval ...`` or ``... lm-eval ...`` (what ``sb-hf eval`` / ``sb-hf lm-eval`` run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m sb_hf.evaluation", description=sys.modules[__package__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_arguments(sub.add_parser("eval", help="exact vs support basis vs AS23a on lm-eval tasks"))
    sub.add_parser("lm-eval", help="lm-eval's own command line with the sb-hf backends", add_help=False)
    args = parser.parse_args(argv)
    import sb_hf  # noqa: F401

    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"sb-hf eval: error: {err}", file=sys.stderr)
        return 2
