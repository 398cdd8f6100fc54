"""mkdocs hook: writes the reference pages that come from the code at build time, so they cannot go stale.

* ``reference/config.md``: every key of :class:`xcit.config.train_config.TrainConfig`, in the groups of
  ``xcit train --help`` (:data:`xcit.config.options.GROUPS`), with its type or choices, default and help text.
* ``reference/cli.md``: each command's ``--help`` as its argparse parser prints it.

It also serves the repository's ``assets/*.png`` (the README's figures) under ``assets/`` of the site, so the pages
show the same images and ``mkdocs build --strict`` checks the links to them.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import fields
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def _cell(text: str) -> str:
    """Help text as one table cell: ``<split>`` is text, not an HTML tag, and ``*`` / ``|`` are literal."""
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("|", "\\|"), ("\n", " ")):
        text = text.replace(raw, escaped)
    return text


def config_page() -> str:
    """The config reference as Markdown: one table per ``--help`` group, from the dataclass fields' own help."""
    from xcit.config.options import GROUPS, metavar, show
    from xcit.config.train_config import _CHOICES, _DEFAULTS, _TYPES, TrainConfig

    keys = list(fields(TrainConfig))
    title_of = {k: title for title, names in GROUPS.items() for k in names}
    lines = [
        "# Config keys",
        "",
        "Every key `xcit train`, `xcit validate`, `python train.py` and `xcit.train(...)` accept, generated from",
        "`xcit.config.train_config.TrainConfig` when the site is built. A key is set, from lowest to highest",
        "precedence, by its default here, the `-c/--config` YAML recipe, and `--key value` on the command line",
        "(see [Training](../tutorials/training.md#configuration)). `[xcit]` marks keys MindCV does not have.",
        "",
    ]
    for title in (*GROUPS, "other"):
        group = [f for f in keys if title_of.get(f.name, "other") == title]
        if not group:
            continue
        lines += [
            f"## {title[0].upper()}{title[1:]}",
            "",
            "| key | type | default | what it does |",
            "|---|---|---|---|",
        ]
        for f in group:
            kind = metavar(_TYPES[f.name], _CHOICES.get(f.name))
            lines.append(f"| `{f.name}` | `{kind}` | `{show(_DEFAULTS[f.name])}` | {_cell(f.metadata['help'])} |")
        lines.append("")
    return "\n".join(lines)


def help_text(command: str) -> str:
    """``xcit COMMAND --help`` as printed, at a fixed width so the page does not depend on the terminal."""
    from xcit.cli.main import main

    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([command, "--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue().rstrip()


def cli_page() -> str:
    """The CLI reference: the command table of ``xcit`` and each command's ``--help``."""
    from xcit.cli.main import COMMANDS

    lines = [
        "# Command line",
        "",
        "`xcit <command> [options]`; `python -m xcit.cli` is the same program (what torchrun starts), and",
        "`python train.py` / `python validate.py` at the repository root are `xcit train` / `xcit validate` under",
        "MindCV's names. Every long option may be written with dashes or underscores",
        "(`--batch-size` = `--batch_size`).",
        "`xcit --version` prints the version. This page is generated from the commands' own argparse parsers when",
        "the site is built; the tutorials show each command at work.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    lines += [f"| [`xcit {name}`](#xcit-{name}) | {_cell(text)} |" for name, (_, text) in COMMANDS.items()]
    lines.append("")
    for name in COMMANDS:
        lines += [f"## xcit {name}", "", "```text", help_text(name), "```", ""]
    return "\n".join(lines)


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - mkdocs' hook signature
    files.append(File.generated(config, "reference/config.md", content=config_page()))
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    for png in sorted((ROOT / "assets").glob("*.png")):
        files.append(File(f"assets/{png.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
