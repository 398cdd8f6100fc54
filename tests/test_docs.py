"""The commands and snippets in README.md and docs/ run as written.

The convention (docs/notes/development.md, "Commands in the documentation"):

* a fenced block tagged ``bash`` is a command, and ``python`` a snippet, that runs on a CPU-only machine with no
  network: the slow test below runs every such block of a page, in the page's order, in a fresh copy of the working
  tree (the repository root as working directory, ``.venv/bin`` first on ``PATH``), and fails with the page, the
  block and its output when one fails;
* ``sh`` and ``py`` blocks are shown and not run: they need what a CI machine lacks (ImageNet, a GPU, the Hub or
  other network, MindSpore, a real cluster) or take minutes; their first line is a comment saying which;
* ``text``, ``yaml``, ``json`` and ``toml`` blocks are output or file contents.

The set-up commands of the README (the virtual environment and ``pip install``) and the test command are the ones
``.ci/run`` runs, so the harness checks that they are there instead of running pip and pytest inside pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = {"bash", "python"}
SHOWN = {"sh", "py"}
OUTPUT = {"text", "yaml", "json", "toml"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[^\s`{]*)")
BLOCK_TIMEOUT_S = 900  # the README runs the whole demo: about 70 s on 2 quiet cores, minutes on a busy machine


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    tag: str
    text: str

    def where(self) -> str:
        return f"{self.page}:{self.line} ({self.tag} block)"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, in a fixed order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their tag and text (indentation of list items removed)."""
    found, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = m["indent"], m["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        found.append(Block(str(path.relative_to(ROOT)), start + 1, m["tag"].lower(), "\n".join(body) + "\n"))
        i += 1
    return found


# -- the commands CI runs itself --------------------------------------------------------------------------------------

CI_SCRIPT = ROOT / ".ci" / "run"
SETUP = re.compile(r"^(python3 -m venv \.venv|\.venv/bin/pip install .+)$")
TEST_COMMAND = ".venv/bin/python -m pytest"


def _extras(spec: str) -> set[str]:
    m = re.fullmatch(r"""-e ['"]?\.(?:\[([\w,-]+)\])?['"]?""", spec.strip())
    return set(m[1].split(",")) if m and m[1] else set()


def run_by_ci(part: str) -> bool:
    """Whether one ``&&``-part of a command is what ``.ci/run`` runs: the venv, its pip installs (a package install
    with extras CI also installs) or the test command."""
    ci = CI_SCRIPT.read_text()
    if part == TEST_COMMAND:
        return f'{TEST_COMMAND} "$@"' in ci
    if not SETUP.match(part):
        return False
    if part.startswith(".venv/bin/pip install -e"):
        ci_specs = re.findall(r"\.venv/bin/pip install (-e '[^']*')", ci)
        return any(_extras(part[len(".venv/bin/pip install ") :]) <= _extras(spec) for spec in ci_specs)
    return part in ci


def to_run(block: Block) -> str:
    """The part of a ``bash`` block the harness runs: the block, less a leading set-up chain and a trailing test
    command that ``.ci/run`` runs itself (``python3 -m venv .venv && .venv/bin/pip install ... && <the rest>``)."""
    lines = block.text.rstrip("\n").split("\n")
    parts = [p.strip() for p in lines[0].split(" && ")]
    while parts and run_by_ci(parts[0]):
        parts.pop(0)
    return "\n".join([" && ".join(parts), *lines[1:]]).strip() + "\n"


# -- fast checks of the convention -------------------------------------------------------------------------------------


def all_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page)]


def test_every_block_is_tagged_with_a_known_tag():
    """An untagged or misspelt block would be neither run nor marked as not run: each one is one of the tags."""
    bad = [b.where() for b in all_blocks() if b.tag not in RUN | SHOWN | OUTPUT]
    assert not bad, f"blocks tagged outside {sorted(RUN | SHOWN | OUTPUT)}: {bad}"


def test_blocks_not_run_say_why():
    """``sh`` / ``py`` blocks open with a comment saying what they need, so that none is left unrun by accident."""
    bad = [b.where() for b in all_blocks() if b.tag in SHOWN and not b.text.lstrip().startswith("#")]
    assert not bad, f"blocks not run without a first-line comment saying why: {bad}"


def test_readme_commands_are_covered():
    """Every command in the README is run: by the harness (``bash``, ``python``), or by ``.ci/run`` (its set-up and
    test command, checked here); the main job and the test command are both there."""
    readme = blocks(ROOT / "README.md")
    shown = [b.where() for b in readme if b.tag in SHOWN and "needs" not in b.text.splitlines()[0]]
    assert not shown, f"README blocks left unrun without needing what CI lacks: {shown}"
    commands = [b for b in readme if b.tag == "bash"]
    test_command = [b for b in commands if b.text.strip().endswith(f"&& {TEST_COMMAND}")]
    assert len(test_command) == 1, "the README gives the test command once, as one line"
    assert to_run(test_command[0]) == "\n", f"the README's test command is not the one .ci/run runs: {test_command[0]}"
    main_job = [b for b in commands if b.text.startswith("python3 -m venv .venv") and b not in test_command]
    assert main_job and to_run(main_job[0]).strip() == ".venv/bin/xcit train", "the README's main job is its demo"


def test_run_by_ci_is_strict():
    """The set-up rule accepts CI's own commands and nothing else (so the harness cannot skip a real command)."""
    assert run_by_ci("python3 -m venv .venv") and run_by_ci(".venv/bin/pip install torch==2.14.1 torchvision==0.29.1")
    assert run_by_ci(".venv/bin/pip install -e .") and run_by_ci(".venv/bin/pip install -e '.[dev,docs]'")
    assert run_by_ci(TEST_COMMAND)
    assert not run_by_ci(".venv/bin/pip install -e '.[dev,nonexistent]'")
    assert not run_by_ci(".venv/bin/pip install torch==2.0.0") and not run_by_ci(".venv/bin/xcit train")
    block = Block("x.md", 1, "bash", "python3 -m venv .venv && .venv/bin/pip install -e . && xcit models\n")
    assert to_run(block) == "xcit models\n"


def test_pages_with_commands_are_collected():
    """The slow test's pages are exactly those with runnable blocks, the README among them."""
    runnable = {b.page for b in all_blocks() if b.tag in RUN}
    assert "README.md" in runnable and any(p.startswith("docs/") for p in runnable)
    assert set(PAGES_TO_RUN) == runnable


PAGES_TO_RUN = sorted({b.page for b in all_blocks() if b.tag in RUN})


# -- the slow harness ------------------------------------------------------------------------------------------------


def working_copy(dst: Path) -> Path:
    """What a fresh clone of the working tree holds: tracked files and untracked ones git does not ignore (so a page
    and the code it documents can be checked before they are committed), with ``.venv`` linked in."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_symlink() and not src.exists():  # deleted in the working tree
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel, follow_symlinks=False)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return dst


def environment(repo: Path) -> dict[str, str]:
    """``.venv/bin`` first on PATH, and the copy's ``xcit`` package ahead of the editable install's."""
    env = dict(os.environ)
    env["PATH"] = f"{repo / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(repo / ".venv")
    env["PYTHONPATH"] = str(repo)
    env.pop("PYTHONSTARTUP", None)
    env.pop("XCIT_THREADS", None)  # a reader's shell has none: runs pick their own thread count (tests fix it to 2)
    return env


def _text(out: bytes | str | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_block(block: Block, repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if block.tag == "python":
        cmd = [str(repo / ".venv" / "bin" / "python"), "-c", block.text]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", to_run(block)]
    return subprocess.run(
        cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("page", PAGES_TO_RUN)
def test_page_commands_run(page, tmp_path):
    """Every ``bash`` and ``python`` block of the page, in order, in one fresh working copy."""
    repo = working_copy(tmp_path / "repo")
    env = environment(repo)
    for block in blocks(ROOT / page):
        if block.tag not in RUN:
            continue
        try:
            proc = run_block(block, repo, env)
        except subprocess.TimeoutExpired as e:
            output = (_text(e.stdout) + _text(e.stderr))[-6000:]
            pytest.fail(f"{block.where()} ran past {BLOCK_TIMEOUT_S} s:\n{block.text}\n--- output (tail) ---\n{output}")
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr)[-6000:]
            pytest.fail(f"{block.where()} exited {proc.returncode}:\n{block.text}\n--- output (tail) ---\n{output}")


def test_working_copy_uses_its_own_package(tmp_path):
    """The copy's ``xcit`` is the one imported, not the editable install's (a page is checked with its own code)."""
    repo = working_copy(tmp_path / "repo")
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('xcit').origin)"],
        cwd=tmp_path,
        env=environment(repo),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out).resolve().is_relative_to(repo.resolve())
