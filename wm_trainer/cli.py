"""The ``wm-trainer`` command: one subcommand per stage, errors as one line on stderr."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence

from extensions.schema import ConfigError, describe

from .base.errors import UserError
from .config import Config, dump_config, load_config, write_resolved

# subcommand -> (module, function, one-line help). Each function takes (cfg, args) and
# returns an exit code or None; modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "mdn-toy": ("wm_trainer.toy", "main", "MSE net vs MDN on the toy x = y + 0.3 sin(2 pi y); plots + metrics"),
    "collect": ("wm_trainer.collect", "main", "collect random-policy episodes (parallel, resumable)"),
    "train-vae": ("wm_trainer.train_vae", "main", "train V, the convolutional VAE, on collected frames"),
    "encode": ("wm_trainer.encode", "main", "encode every episode's frames to (mu, logvar) with V"),
    "train-mdnrnn": ("wm_trainer.train_mdnrnn", "main", "train M, the MDN-RNN, on encoded episodes"),
    "train-controller": ("wm_trainer.train_controller", "main", "train C with CMA-ES in the real env or the dream"),
    "evaluate": ("wm_trainer.evaluate", "main", "score the agent and the random policy over N real episodes"),
    "render": ("wm_trainer.render", "main", "write GIFs of the agent and of a dream, and a VAE reconstruction grid"),
    "pipeline": ("wm_trainer.pipeline", "main", "run every stage in order, skipping those already complete"),
}

EXTRA_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "evaluate": lambda p: (
        p.add_argument("--episodes", type=int, default=None, help="real episodes (default: evaluate.episodes)"),
        p.add_argument("--controller", metavar="FILE", default=None,
                       help="score this controller file instead of the run's controller.npz, e.g. a CMA-ES mean "
                            "saved at a selection (controller/scored/gen_NNNNNN.npz)"),
        p.add_argument("--agent-only", action="store_true",
                       help="play only the agent's episodes, not the two random baselines (a third of the time); "
                            "with either option the result goes to <controller file>.eval.json beside the file "
                            "scored, never to the run's eval.json")),
}


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, metavar="FILE", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set vae.batch_size=64 (repeatable)")
    p.add_argument("--float64", action="store_true", help="shortcut for --set debug.float64=true")
    p.add_argument("--device", type=int, default=None, metavar="N",
                   help="shortcut for --set experiment.device=N (-1 = CPU, 0 = first GPU)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one-line help per subcommand."""
    parser = argparse.ArgumentParser(
        prog="wm-trainer",
        description="World Models (Ha & Schmidhuber 2018) on Chainer, with a training-debugging toolkit. "
                    "Every command reads one YAML config; see `wm-trainer config show --help`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cfg_p = sub.add_parser("config", help="show the resolved config or the documented keys",
                           description="Inspect configuration.")
    cfg_sub = cfg_p.add_subparsers(dest="config_command", metavar="ACTION")
    show = cfg_sub.add_parser("show", help="print the resolved config (includes, --set and --float64 applied)",
                              description="Print the resolved config as YAML.")
    _add_config_args(show, required=False)
    keys = cfg_sub.add_parser("keys", help="list every config key with its type, default and meaning",
                              description="List every config key with its type, default and meaning.")
    keys.add_argument("section", nargs="?", help="only this section")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        _add_config_args(p)
        if name in EXTRA_ARGS:
            EXTRA_ARGS[name](p)
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"experiment.device={args.device}")
    return load_config(args.config, overrides, float64=args.float64)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "config":
        if args.config_command == "show":
            sys.stdout.write(dump_config(_load(args)))
            return 0
        if args.config_command == "keys":
            for path, tp, default, help_text in describe(Config):
                if args.section and not path.startswith(args.section + "."):
                    continue
                print(f"{path:40s} {tp:24s} {default!r:12s} {help_text}")
            return 0
        parser.parse_args(["config", "--help"])
        return 0
    cfg = _load(args)
    from . import ops

    ops.select(cfg.experiment.ops)
    write_resolved(cfg, cfg.run_dir)
    module, func, _ = COMMANDS[args.command]
    result = getattr(importlib.import_module(module), func)(cfg, args)
    return int(result or 0)


def _one_line(exc: BaseException) -> str:
    summary = getattr(exc, "summary", None)
    text = summary() if callable(summary) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it stops its workers and games on the way out as Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs a subcommand; user-facing errors become one line and a non-zero exit."""
    from extensions import NonFiniteError, NpzLoadError

    from .training import distributed

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    code = 1
    try:
        code = _run(argv)
        return code
    except Terminated:
        print("wm-trainer: terminated; re-run the same command to resume", file=sys.stderr)
        code = 143
    except (ConfigError, UserError, NpzLoadError) as e:
        print(f"wm-trainer: error{_rank()}: {_one_line(e)}", file=sys.stderr)
        code = 2
    except NonFiniteError as e:
        print(f"wm-trainer: non-finite{_rank()}: {_one_line(e)}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        print("wm-trainer: interrupted; re-run the same command to resume", file=sys.stderr)
        code = 130
    except Exception:
        if distributed.current().size > 1:  # the abort below ends the process before Python would print it
            traceback.print_exc()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if code != 0:  # one process of a data-parallel run failing alone would leave the others in an all-reduce
            distributed.current().abort(code)
    return code


def _rank() -> str:
    """`` (rank R of N)`` in a data-parallel run, else nothing."""
    from .training import distributed

    world = distributed.current()
    return f" (rank {world.rank} of {world.size})" if world.size > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
