"""The ``learned-opt`` command: one argparse subcommand per job.

Each subcommand lives in the module that does the work; that module exposes ``configure(parser)``
(adds its arguments) and ``main(args) -> int``. Errors of the package's own type become a one-line
message on stderr and exit code 2; running out of memory (sizes or counts too large for the machine)
or failing to write a file for a full disk or its permissions a one-line message and exit code 1;
nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys

from . import __version__

OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate|not enough memory", re.IGNORECASE)
from .errors import LearnedOptError

# name -> (module, one-line help). Modules are imported only to build their own subparser;
# the `pretrain` commands are left out of an installation without the `pretrain` package.
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("pretrain.corpus", "train many networks at once and store their checkpoints"),
    "train": ("pretrain.train", "train a generator on a checkpoint corpus"),
    "eval": ("pretrain.evaluate", "evaluate a generator on fresh inits, against Adam and SGD (MNIST) or PPO (CartPole)"),
    "demo": ("learned_opt.demo", "one generative update on a random CartPole policy or MNIST network (MLP or CNN), next to PPO or Adam and SGD"),
    "bench": ("pretrain.bench", "measure GptOptimizer's periodic mode against its base, or the learned optimizer against Adam and SGD"),
    "meta-train": ("pretrain.metatrain", "meta-train the per-parameter learned optimizer (LearnedOptimizer) by PES"),
    "tune-sampling": ("pretrain.sampling", "choose a generator's sampler (steps, early stop) on validation inits"),
    "tune-head": ("pretrain.head_tuning", "teach a generator's property head to rank its own samples (rank='self')"),
}


START_HERE = """\
Start here: `learned-opt demo` makes one generative update on a random CartPole policy and
trains the same policy with PPO next to it (offline, nothing to download, under a minute on a
CPU). Then `learned-opt demo --task mnist-mlp --data-root DIR` for MNIST (`--task mnist-cnn`
for G.pt's CNN), and `learned-opt COMMAND -h` for each command. On a busy machine set
OMP_NUM_THREADS (e.g. OMP_NUM_THREADS=1)."""

# reStructuredText roles and literals of docstrings, which --help would print as they are
_RST_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` without reStructuredText markup: ``x`` -> x, :func:`~a.b.f` -> f."""
    text = _RST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


class OneLineParser(argparse.ArgumentParser):
    """A usage error in one line that points to the command's help, exit code 2 (argparse's own
    prints the whole usage first)."""

    commands: dict[str, OneLineParser]  # the top parser's subcommand parsers, by name

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="learned-opt",
        description="Train networks with a generative model of neural-network checkpoints.",
        epilog=START_HERE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    parser.commands = sub.choices
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # the module (or its package) is not installed: the subcommand is not offered; a
            # dependency missing *inside* the module is a real error and propagates
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
                raise
            continue
        doc = module.__doc__ or help_text  # python -OO strips docstrings
        p = sub.add_parser(name, help=help_text, description=plain_text(" ".join(doc.strip().split("\n\n")[0].split())))
        module.configure(p)
        for action in p._actions:  # argparse keeps no public list; help texts may quote docstrings
            if action.help and action.help is not argparse.SUPPRESS:
                action.help = plain_text(action.help)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command they were given to, whose help lists what it takes
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args._main(args) or 0)
    except LearnedOptError as exc:
        print(f"learned-opt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"learned-opt {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a folder made read-only mid-job: what was saved is kept
        todo = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EFBIG: "free space",
                errno.EACCES: "fix permissions", errno.EPERM: "fix permissions", errno.EROFS: "fix permissions"}
        if exc.errno not in todo:
            raise
        print(f"learned-opt {args.command}: error: {exc}: {todo[exc.errno]}, then run the command again (jobs "
              f"that checkpoint take --resume)", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:  # torch reports a failed allocation as a RuntimeError
        text = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, MemoryError) and not OUT_OF_MEMORY.search(str(exc)):
            raise
        print(f"learned-opt {args.command}: error: out of memory ({text}): lower the sizes or counts given "
              f"(see learned-opt {args.command} -h)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
