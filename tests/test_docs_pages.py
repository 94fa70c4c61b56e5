"""README.md and docs/*.md stay true: their code blocks, the commands in them and their relative links.

The pages are read as GitHub renders them: fenced code blocks, inline code spans, `[text](target)`
links and headings (whose anchors GitHub derives from their text). `python run.py` commands are
checked by tests/test_readme.py (composed and validated, a few run); every other command is checked
here by its kind, and a command of a kind nobody checks fails, so none is left unchecked. Each check is
a function returning the problems it found, and the last tests show that each finds a broken copy.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# The other READMEs link into docs/ too: their links are checked as well (their commands are not).
LINKED = [*PAGES, *(REPO / p / "README.md" for p in ("experiments", "results", "results/diagnostics", "dynamo_kernels"))]
FENCE = re.compile(r"^\s*```(\S*)\s*$")
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
SHELL = ("bash", "sh", "shell", "console")
# A block whose first line names a repository file shows that file: verbatim, or a contiguous part of
# it when the name is followed by "(excerpt)".
HEADER = re.compile(r"^# (?P<path>[\w./-]+\.(?:py|ya?ml|json|toml|sh))(?P<excerpt> \(excerpt\))?\n")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
# Commands run by a dedicated test rather than here, and the test that runs each.
CHECKED_ELSEWHERE = {"lm_eval": "tests/export/test_lm_eval_cli.py"}


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: the page, the line of its opening fence, its language and its text."""

    page: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lang, start, body = [], None, 0, []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if lang is None and fence:
            lang, start, body = fence.group(1), number, []
        elif lang is not None and fence and not fence.group(1):
            found.append(Block(page, start, lang, "".join(body)))
            lang = None
        elif lang is not None:
            body.append(line + "\n")
    assert lang is None, f"{page}:{start}: a code block is never closed"
    return found


def prose(text: str) -> str:
    """The page without its fenced blocks (blank lines instead, so positions keep their line)."""
    out, inside = [], False
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and (not inside or not fence.group(1)):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def _command_lines(text: str) -> list[str]:
    """The commands of a shell block: continued lines joined, comments dropped, `a && b` split."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            if words[:cut]:
                commands.append(shlex.join(words[:cut]))
            words = words[cut + 1:]
    return commands


def _is_command_span(span: str) -> bool:
    words = [w for w in span.split() if not ENV.match(w)]
    return bool(words) and (words[0] in ("python", "python3.11", "bash", "pip", *CHECKED_ELSEWHERE)
                            or re.match(r"scripts/\S+\.py$", words[0]) is not None)


def commands(page: Path) -> list[str]:
    """Every command a page shows: the lines of its shell blocks and its inline spans that are commands."""
    found = [c for b in blocks(page) if b.lang in SHELL for c in _command_lines(b.text)]
    for span in SPAN.findall(prose(page.read_text())):
        span = " ".join(span.split())
        if _is_command_span(span):
            found.append(span)
    return list(dict.fromkeys(found))


def all_commands() -> list[str]:
    return list(dict.fromkeys(c for page in PAGES for c in commands(page)))


# ---- checks: each returns the problems it finds ----

def words_of(command: str) -> list[str]:
    words = [w for w in shlex.split(command) if not ENV.match(w)]
    if words and re.match(r"scripts/\S+\.py$", words[0]):  # written without `python` in a sentence
        words = ["python", *words]
    return words


def _markers() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    return {m.split(":")[0].strip() for m in config.get("markers", [])}


def command_problems(command: str) -> list[str]:
    """What is wrong with a shell command that is not `python run.py`: its script, options, extras, tests."""
    words = words_of(command)
    head, rest = words[0], words[1:]
    if head in CHECKED_ELSEWHERE:
        return [] if (REPO / CHECKED_ELSEWHERE[head]).is_file() else [f"{command}: {CHECKED_ELSEWHERE[head]} is gone"]
    if head in (".", "source"):
        return [] if rest == [".venv/bin/activate"] else [f"{command}: only the venv's activate is expected"]
    if head == "pip":
        extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        wanted = [e for w in rest for e in re.findall(r"^\.\[([\w,-]+)\]$", w) for e in e.split(",")]
        if rest[:2] != ["install", "-e"] or not (set(rest[2:]) <= {"."} or wanted):
            return [f"{command}: expected pip install -e . or -e \".[extra]\""]
        return [f"{command}: no extra '{e}' in pyproject.toml" for e in wanted if e not in extras]
    if head == "bash":
        return [] if rest and (REPO / rest[0]).is_file() else [f"{command}: no such script"]
    if head not in ("python", "python3.11"):
        return [f"{command}: no check knows this kind of command (add one to tests/test_docs_pages.py)"]
    if rest[:2] == ["-m", "venv"]:
        return []
    if rest[:2] == ["-m", "pytest"]:
        problems = [f"{command}: no {w}" for w in rest[2:] if w.startswith("tests") and not (REPO / w).exists()]
        options = rest[2:]
        if "-m" in options:
            expression = options[options.index("-m") + 1]
            unknown = set(re.findall(r"\w+", expression)) - {"and", "or", "not"} - _markers()
            problems += [f"{command}: marker '{m}' is not registered in pyproject.toml" for m in sorted(unknown)]
        return problems
    if rest and rest[0] == "run.py":
        return []  # tests/test_readme.py
    if not rest or not re.match(r"scripts/\S+\.py$", rest[0]):
        return [f"{command}: no check knows this kind of python command"]
    script = REPO / rest[0]
    if not script.is_file():
        return [f"{command}: no {rest[0]}"]
    source = script.read_text()
    options = {w.split("=")[0] for w in rest[1:] if w.startswith("--")}
    return [f"{command}: {rest[0]} has no option {o}" for o in sorted(options)
            if f'"{o}"' not in source and f"'{o}'" not in source]


def shown_file_problems(block: Block) -> list[str]:
    """A block headed `# <repository file>` is that file (or, marked "(excerpt)", a part of it)."""
    header = HEADER.match(block.text)
    if header is None:
        return []
    path = REPO / header["path"]
    if not path.is_file():
        return [f"{block}: shows {header['path']}, which does not exist"]
    body, text = block.text[header.end():], path.read_text()
    if header["excerpt"]:
        return [] if body in text else [f"{block}: not a part of {header['path']} as it is"]
    return [] if body == text else [f"{block}: differs from {header['path']}"]


def python_problems(block: Block) -> list[str]:
    """A Python block parses, its imports resolve, and `name.attr` on an imported name exists."""
    try:
        tree = ast.parse(block.text)
    except SyntaxError as err:
        return [f"{block}: {err}"]
    problems, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            try:
                module = importlib.import_module(node.module)
            except ImportError as err:
                problems.append(f"{block}: {err}")
                continue
            for alias in node.names:
                try:
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
                except AttributeError:
                    try:  # `from package import submodule`
                        bound[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        problems.append(f"{block}: {node.module} has no {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    bound[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
                except ImportError as err:
                    problems.append(f"{block}: {err}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if not hasattr(bound[node.value.id], node.attr):
                problems.append(f"{block}: {node.value.id} has no {node.attr}")
    return problems


def yaml_problems(block: Block) -> list[str]:
    try:
        yaml.safe_load(block.text)
    except yaml.YAMLError as err:
        return [f"{block}: {err}"]
    return []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", page.read_text()))
    for line in prose(page.read_text()).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_problems(page: Path, root: Path = REPO) -> list[str]:
    """Every relative link of a page names a file or folder inside the repository, and its #anchor a
    heading of that page. Web links are not followed (the tests run offline)."""
    problems = []
    text = SPAN.sub(lambda m: " " * len(m.group(0)), prose(page.read_text()))  # code is not a link
    for match in LINK.finditer(text):
        target = match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(root)}:{text.count(chr(10), 0, match.start()) + 1}: [{match.group(1)}]({target})"
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            problems.append(f"{where}: no heading with anchor #{anchor} there")
    return problems


# ---- the pages as they are ----

def test_the_pages_are_the_readme_and_the_docs_folder():
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    assert {"README.md", "docs/README.md", "docs/method.md", "docs/results.md"} <= names, names
    assert len(all_commands()) >= 40, all_commands()


@pytest.mark.parametrize("page", LINKED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_code_blocks_parse_import_and_show_the_files_they_name(page):
    problems = []
    for block in blocks(page):
        problems += shown_file_problems(block)
        if block.lang == "python":
            problems += python_problems(block)
        elif block.lang in ("yaml", "yml"):
            problems += yaml_problems(block)
    assert problems == []


def test_every_command_other_than_run_py_is_checked_and_true():
    problems = [p for c in all_commands() for p in command_problems(c)]
    assert problems == []


def test_the_readme_sample_output_is_what_run_py_prints_for_the_record_it_names():
    import json

    from dynamo.report import summary_table

    readme = PAGES[0]
    path = re.search(r"record:\s*`(results/runs/[^`]+/result\.json)`", readme.read_text()).group(1)
    record = json.loads((REPO / path).read_text())
    (sample,) = [b for b in blocks(readme) if b.lang == "" and b.text.startswith(record["model"]["name"])]
    assert sample.text == summary_table(record, list(record["config"]["dataset"]["known"])) + "\n"


# ---- each check finds what it guards against ----

def _page(tmp_path: Path, name: str, text: str) -> Path:
    page = tmp_path / name
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def test_a_broken_link_or_a_missing_anchor_is_found(tmp_path):
    _page(tmp_path, "docs/other.md", "# Other page\n\n## What a `run` needs: *two* things\n\n## Again\n\n## Again\n")
    good = _page(tmp_path, "README.md", "[a](docs/other.md) [b](docs/other.md#what-a-run-needs-two-things) "
                 "[c](docs/other.md#again-1) [d](#top) [e](https://example.org/x) `[no](link.md)`\n\n# Top\n")
    assert link_problems(good, tmp_path) == []
    bad = _page(tmp_path, "docs/bad.md", "[a](missing.md) [b](other.md#nope) [c](../../outside.md)\n"
                "[d](other.md#again-2) [e](#bad)\n\n```bash\n[not checked](in-code.md)\n```\n")
    problems = link_problems(bad, tmp_path)
    assert len(problems) == 5 and "missing.md): no such file" in problems[0] and "#nope" in problems[1], problems
    assert "outside the repository" in problems[2] and "#again-2" in problems[3] and "#bad" in problems[4]


def test_a_command_that_is_no_longer_true_is_found():
    assert command_problems("python scripts/make_tables.py --check") == []
    assert command_problems("OMP_NUM_THREADS=1 python scripts/dqs_fidelity.py") == []
    assert "has no option --chek" in command_problems("python scripts/make_tables.py --chek")[0]
    assert "no scripts/gone.py" in command_problems("scripts/gone.py --model olmoe")[0]
    assert "no extra 'nope'" in command_problems('pip install -e ".[nope]"')[0]
    assert "marker 'nope'" in command_problems('python -m pytest -m "not nope" tests/test_stats.py')[0]
    assert "no tests/gone.py" in command_problems("python -m pytest tests/gone.py")[0]
    assert "no check knows" in command_problems("make all")[0]


def test_a_code_block_that_is_no_longer_true_is_found(tmp_path):
    page = _page(tmp_path, "page.md", "```python\nfrom dynamo import stats\nstats.compare_runs(a, b)\n"
                 "stats.compare_rns(a, b)\nfrom dynamo.stats import nothing_here\n```\n\n```python\ndef (\n```\n\n"
                 "```yaml\na: [1\n```\n\n```yaml\n# conf/quant/fp16.yaml\nname: changed\n```\n\n"
                 "```python\n# run.py (excerpt)\nnot in the file\n```\n")
    python, broken, bad_yaml, shown, excerpt = blocks(page)
    assert python_problems(python) == [f"{python}: dynamo.stats has no nothing_here", f"{python}: stats has no compare_rns"]
    assert python_problems(broken) and yaml_problems(bad_yaml) and not yaml_problems(shown)
    assert "differs from conf/quant/fp16.yaml" in shown_file_problems(shown)[0]
    assert "not a part of run.py" in shown_file_problems(excerpt)[0]
    real = Block(page, 1, "yaml", "# conf/quant/fp16.yaml\n" + (REPO / "conf/quant/fp16.yaml").read_text())
    assert shown_file_problems(real) == []
