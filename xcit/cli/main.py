"""The ``xcit`` command: ``xcit <command> [options]``. Each command lives in its own module with a ``main(argv)``."""

from __future__ import annotations

import faulthandler
import importlib
import logging
import signal
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("xcit.cli.models", "list the model variants with params, GMACs and resolution"),
    "train": ("xcit.cli.train", "train (MindCV-style YAML + flags; no data_dir runs the built-in demo)"),
    "validate": ("xcit.cli.validate", "top-1/top-5 validation of a checkpoint"),
    "predict": ("xcit.cli.predict", "top-k predictions for images or folders"),
    "attention": ("xcit.cli.attention", "class-attention and channel-attention maps as PNG overlays"),
    "convert": ("xcit.cli.convert", "convert weights between official, timm, MindCV and safetensors"),
    "export": ("xcit.cli.export", "export to ONNX, TorchScript or torch.export"),
    "shard": ("xcit.cli.shard", "write an ImageFolder as WebDataset tar shards"),
    "benchmark": ("xcit.cli.benchmark", "throughput, memory and GMACs, optionally against timm"),
    "submit": ("xcit.cli.submit", "run xcit train as a SLURM job (submitit): requeued on preemption, resumes exactly"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: xcit <command> [options]   (xcit --version)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `xcit <command> --help` for a command's options."]
    return "\n".join(lines)


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to the process's stderr: where a hung rank waits."""
    stderr = sys.__stderr__
    if not hasattr(signal, "SIGUSR1") or stderr is None:
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=stderr, all_threads=True)
    except (OSError, ValueError, AttributeError):  # a stderr without a file descriptor (an embedding host)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _stacks_on_sigusr1()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"xcit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"xcit: unknown command {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""), file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[name][0]:
            print(f"xcit: the {name!r} command is not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(rest) or 0)
    except BrokenPipeError:  # `xcit models | head`: the reader left; stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE
    except (ValueError, OSError, ImportError) as e:  # bad input, files, missing extras: one line, exit 2
        if isinstance(e, ImportError) and (e.name or "").split(".")[0] in ("", "xcit"):
            raise  # a broken installation of this package itself: keep the traceback
        print(f"xcit {name}: error: {error_line(e)}", file=sys.stderr)
        return 2


# optional dependencies -> the extra that installs them (pyproject.toml)
EXTRAS = {
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "huggingface_hub": "hub",
    "tensorboard": "tensorboard",
    "webdataset": "data",
    "datasets": "data",
    "submitit": "slurm",
}


def error_line(e: BaseException) -> str:
    """The one line the CLI prints for an error: a missing optional package names the extra that installs it."""
    if isinstance(e, ImportError) and e.name:
        top = e.name.split(".")[0]
        extra = EXTRAS.get(top)
        fix = f"pip install -e '.[{extra}]' (or pip install {top})" if extra else f"pip install {top}"
        return f"the optional package {top!r} is not installed: {fix}"
    return str(e).strip() or type(e).__name__
