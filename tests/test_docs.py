"""The docs stay true to the code: every `python -m` command in README.md and docs/ names a module
that exists, its --config file and argument load, and every --config.FIELD it overrides is a
field of that config; every config file named exists (and loads with its argument); every
relative link and image resolves, anchors included, and pictures stay under 200 KB. A self-check feeds each rule a page with
one mistake and requires that the rule reports it."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from mim_jax.config_file import load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```(\w*)\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CONFIG_SPEC = re.compile(r"(?<![\w/])(configs/\w+\.py)(?::([\w=/.,+-]+))?")
# Files a page tells the reader to create: <!-- docs-test: new-file PATH [PATH ...] -->
MAX_PICTURE_BYTES = 200_000  # pictures in the docs stay small
NEW_FILES = re.compile(r"<!--\s*docs-test:\s*new-file\s+([^>]*?)\s*-->")


def _split(text: str):
    """-> (command-like snippets, prose lines): the lines of shell / plain code blocks (with
    backslash continuations joined, split at &&) and the inline code spans outside any block.
    Python blocks are neither: their text is code, not commands."""
    snippets, prose, block, lang = [], [], None, ""
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            if block is None:
                block, lang = [], fence.group(1)
            else:
                if lang != "python":
                    joined = "\n".join(block).replace("\\\n", " ")
                    for cmd in joined.splitlines():
                        snippets.extend(part.strip() for part in cmd.split("&&"))
                block = None
            continue
        if block is not None:
            block.append(line)
        else:
            prose.append(line)
            snippets.extend(INLINE_CODE.findall(line))
    return [s for s in snippets if s], prose


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    _, prose = _split(path.read_text())
    return {_slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


def _has_field(config, dotted: str) -> bool:
    node = config
    for key in dotted.split("."):
        try:
            if key not in node:
                return False
        except TypeError:
            return False
        node = node[key]
    return True


_LOADED = {}


def _load(spec: str):
    """FILE[:ARG][+FIELD=VALUE...] -> (config, None) or (None, the error text)."""
    if spec not in _LOADED:
        try:
            _LOADED[spec] = (load_config(str(REPO / spec) if spec.startswith("configs/")
                                         else spec), None)
        except Exception as e:  # noqa: BLE001 - whatever the config file raises is the finding
            _LOADED[spec] = (None, f"{type(e).__name__}: {e}")
    return _LOADED[spec]


def _check_command(snippet: str, new_files=frozenset()) -> list:
    """Problems with one command-like snippet (empty if it is not a command)."""
    try:
        tokens = shlex.split(snippet)
    except ValueError:
        tokens = snippet.split()
    problems = []
    module = None
    if "-m" in tokens[:-1] and tokens[0].startswith("python"):
        module = tokens[tokens.index("-m") + 1]
        if module.startswith(("mim_jax", "tools")) and importlib.util.find_spec(module) is None:
            problems.append(f"module {module!r} does not exist")
    spec = None
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens):
            spec = tokens[i + 1]
        elif token.startswith("--config="):
            spec = token.split("=", 1)[1]
        elif spec is None and len(tokens) > 1 and CONFIG_SPEC.fullmatch(token):
            spec = token  # a launch script's CONFIG argument
    overrides = [t[len("--config."):].split("=", 1)[0] for t in tokens
                 if t.startswith("--config.")]
    if spec is None:
        if overrides and module is not None:
            problems.append(f"--config.{overrides[0]} without a --config")
        return problems
    if not spec.startswith("configs/") or spec.partition(":")[0] in new_files:
        return problems  # a placeholder such as CONFIG, or a file the page has you create
    config, error = _load(spec)
    if config is None:
        return problems + [f"--config {spec!r} does not load: {error}"]
    for field in overrides:
        if not _has_field(config, field):
            problems.append(f"--config.{field} is not a field of {spec}")
    return problems


def page_problems(path: Path, text: str) -> list:
    snippets, prose = _split(text)
    new_files = {f for group in NEW_FILES.findall(text) for f in group.split()}
    problems = []
    for snippet in snippets:
        problems += [f"{snippet!r}: {p}" for p in _check_command(snippet, new_files)]
    for file, arg in {m for s in [*snippets, *prose] for m in CONFIG_SPEC.findall(s)}:
        if file in new_files:
            continue
        if not (REPO / file).is_file():
            problems.append(f"config file {file} does not exist")
        elif arg:
            config, error = _load(f"{file}:{arg}")
            if config is None:
                problems.append(f"{file}:{arg} does not load: {error}")
    for line in prose:
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                problems.append(f"link {target!r} does not resolve")
            elif resolved.suffix == ".png" and resolved.stat().st_size > MAX_PICTURE_BYTES:
                problems.append(f"picture {target!r} is {resolved.stat().st_size} bytes, over "
                                f"{MAX_PICTURE_BYTES}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"link {target!r}: no heading gives #{anchor}")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_is_true_to_the_code(path):
    assert page_problems(path, path.read_text()) == []


def test_the_pages_exist_and_hold_commands():
    names = {str(p.relative_to(REPO)) for p in PAGES}
    for page in ("README.md", "docs/getting_started.md", "docs/configs.md", "docs/data.md",
                 "docs/checkpoints.md", "docs/scaling.md", "docs/evaluation.md",
                 "docs/conversion.md", "docs/performance.md", "docs/adding_an_objective.md",
                 "docs/objectives/mae.md", "docs/objectives/simmim.md",
                 "docs/objectives/beit.md", "docs/objectives/spark.md"):
        assert page in names
    commands = [s for p in PAGES for s in _split(p.read_text())[0]
                if s.startswith("python -m mim_jax")]
    assert len(commands) > 30  # the checks above ran on real commands


# ---------------------------------------------------------------- the checks can fail

GOOD = "`python -m mim_jax.main --config configs/mae.py:quickstart --workdir w`"


@pytest.mark.parametrize("text, expected", [
    ("`python -m mim_jax.no_such_module --config configs/mae.py`", "does not exist"),
    ("```bash\npython -m mim_jax.main --config configs/mae.py:quickstart \\\n"
     "    --config.model.no_such_field=1 --workdir w\n```", "is not a field"),
    ("`python -m mim_jax.main --config configs/mae.py --config.optimizer.layer_decay=0.7`",
     "is not a field"),  # a field only other configs create
    ("`python -m mim_jax.main --config configs/no_such.py --workdir w`", "does not load"),
    ("`python -m mim_jax.main --config configs/mae.py:no_such_arg=1 --workdir w`",
     "does not load"),
    ("see `configs/no_such.py`", "does not exist"),
    ("```bash\nlaunch/local.sh configs/mae.py:quickstart runs/q --config.seeed=1\n```",
     "is not a field"),
    ("[a page](no_such_page.md)", "does not resolve"),
    ("![a picture](img/no_such.png)", "does not resolve"),
    ("[a section](configs.md#no-such-heading)", "no heading"),
])
def test_each_rule_reports_a_mistake(text, expected):
    problems = page_problems(REPO / "docs" / "page.md", text)
    assert any(expected in p for p in problems), problems
    assert page_problems(REPO / "docs" / "page.md", GOOD) == []


def test_python_blocks_and_declared_new_files_are_not_commands():
    text = ("<!-- docs-test: new-file configs/mine.py -->\nSave as `configs/mine.py`.\n"
            "```python\n# python -m mim_jax.main --config configs/other.py\n```\n")
    assert page_problems(REPO / "docs" / "page.md", text) == []


def test_a_large_picture_is_reported(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\0" * (MAX_PICTURE_BYTES + 1))
    (tmp_path / "small.png").write_bytes(b"\0" * 1000)
    assert page_problems(tmp_path / "page.md", "![ok](small.png)") == []
    problems = page_problems(tmp_path / "page.md", "![too big](big.png)")
    assert problems == [f"picture 'big.png' is {MAX_PICTURE_BYTES + 1} bytes, over "
                        f"{MAX_PICTURE_BYTES}"]
