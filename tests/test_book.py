"""Static checks of the book's sources: fast, no notebook is executed.

The chapter list comes from _toc.yml, so a chapter that is listed but missing
fails here (it is never skipped). Executing the chapters is nbval's job
(``scripts/test.sh``) and the HTML build's (``scripts/book.sh``).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
BIB = BOOK / "references.bib"

INSTALL_CELL = """\
# In Colab, install mlbook when it is missing (the book's build has it).
try:
    import mlbook
except ImportError:
    %pip install -q "mlbook @ git+{url}"
    import mlbook"""


def _toc_files(node) -> list[str]:
    """Every ``file:`` entry of the table of contents, root first, in order."""
    found = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                found.append(node[key])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key) or []:
                found += _toc_files(child)
    return found


TOC_FILES = _toc_files(TOC)
# Chapters are the numbered entries (book/01_..., book/10_...): each must be a notebook.
CHAPTERS = [f for f in TOC_FILES if re.fullmatch(r"book/\d\d_\w+", f)]


def _resolve(entry: str) -> Path | None:
    """The file a toc entry names (its suffix may be omitted), or None."""
    path = ROOT / entry
    if path.suffix in (".ipynb", ".md") and path.exists():
        return path
    for suffix in (".ipynb", ".md"):
        if path.with_suffix(suffix).exists():
            return path.with_suffix(suffix)
    return None


def _notebook(entry: str) -> nbformat.NotebookNode:
    path = ROOT / f"{entry}.ipynb"
    if not path.exists():
        pytest.fail(f"{entry}.ipynb is listed in _toc.yml but does not exist")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        pytest.fail(f"{path.name} is not valid JSON: {err}")
    return nbformat.read(path, as_version=4)


def _heading_position(cells, title: str) -> tuple[int, int]:
    """(cell, line) of the level-2 heading ``## title`` in a markdown cell."""
    heading = re.compile(rf"##\s+{re.escape(title)}\s*$")
    for i, cell in enumerate(cells):
        if cell.cell_type != "markdown":
            continue
        for j, line in enumerate(cell.source.splitlines()):
            if heading.match(line.strip()):
                return i, j
    pytest.fail(f"no markdown heading '## {title}'")


def _bib_keys() -> list[str]:
    return re.findall(r"^\s*@\w+\s*\{\s*([^,\s]+)\s*,", BIB.read_text(), re.M)


def _book_sources() -> list[Path]:
    return sorted(p for p in BOOK.rglob("*") if p.suffix in (".ipynb", ".md")
                  and ".ipynb_checkpoints" not in p.parts)


def _text_of(path: Path) -> str:
    """Markdown and code of a notebook (outputs excluded), or a page's text."""
    if path.suffix == ".ipynb":
        nb = nbformat.read(path, as_version=4)
        return "\n".join(cell.source for cell in nb.cells)
    return path.read_text(encoding="utf-8")


# -- configuration -------------------------------------------------------------------

def test_toc_lists_the_chapters_in_order():
    assert TOC["format"] == "jb-book"
    assert TOC["root"] == "book/intro"
    numbers = [int(re.search(r"/(\d\d)_", f).group(1)) for f in CHAPTERS]
    assert numbers == list(range(1, len(numbers) + 1)), CHAPTERS
    assert len(TOC_FILES) == len(set(TOC_FILES)), "a file is listed twice"


def test_repository_and_colab_launch_button():
    repo = CONFIG["repository"]
    url = repo["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    assert repo.get("branch")
    assert CONFIG["launch_buttons"]["colab_url"].startswith(
        "https://colab.research.google.com")


def test_execution_fails_the_build_on_errors():
    assert CONFIG["execute"]["execute_notebooks"] == "force"
    assert CONFIG["execute"]["raise_on_error"] is True


def test_offline_assets_match_the_config():
    """Every file _config.yml serves from _offline/ is one the script fetches."""
    config = CONFIG["sphinx"]["config"]
    script = (ROOT / "scripts" / "offline_assets.sh").read_text()
    served = {Path(p).name for p in config["html_static_path"]}
    assert served == {"tex-svg.js", "require.js", "embed-amd.js"}
    fetched = set(re.findall(r"^\S+@[\d.]+ package/\S+ ([\w.-]+)\"?$", script, re.M))
    assert served <= fetched, f"scripts/offline_assets.sh fetches {fetched}"
    assert config["mathjax_path"] in served
    assert set(config["nb_ipywidgets_js"]) <= served


# -- every page of the toc -------------------------------------------------------------

@pytest.mark.parametrize("entry", TOC_FILES)
def test_toc_entry_exists(entry):
    assert _resolve(entry) is not None, f"{entry} is in _toc.yml but missing"


def test_no_page_outside_the_toc():
    listed = {_resolve(f) for f in TOC_FILES}
    orphans = [p.relative_to(ROOT) for p in _book_sources() if p not in listed]
    assert not orphans, (
        f"in book/ but not in _toc.yml (nbval would still run them): {orphans}")


def test_bibliography_page_lists_everything():
    text = (BOOK / "bibliography.md").read_text()
    assert re.search(r"```\{bibliography\}[^\n]*\n:all:\s*\n```", text), text


# -- chapters ------------------------------------------------------------------------

@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_format(entry):
    nb = _notebook(entry)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"cell {i} has stored outputs: strip them"
            assert cell.execution_count is None, f"cell {i} has an execution count"
    # nbformat.read adds a missing cell id silently (and warns at every build):
    # the file itself must carry one per cell, each its own
    raw = json.loads((ROOT / f"{entry}.ipynb").read_text(encoding="utf-8"))
    ids = [cell.get("id") for cell in raw["cells"]]
    assert None not in ids, f"cell {ids.index(None)} has no id"
    assert len(set(ids)) == len(ids), "cell ids repeat"


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_opening(entry):
    nb = _notebook(entry)
    first, second = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown"
    assert re.match(r"# \S", first.source), "cell 1 must start with '# Title'"
    assert second.cell_type == "code"
    expected = INSTALL_CELL.format(url=CONFIG["repository"]["url"])
    assert second.source.strip() == expected, (
        "cell 2 must be exactly the install cell, with _config.yml's repository.url")
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert re.search(r"^import mlbook as ml\b", code, re.M), "no `import mlbook as ml`"


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_has_figure_and_asserts(entry):
    nb = _notebook(entry)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "plt.show()" in code, "no matplotlib figure ending in plt.show()"
    assert re.search(r"^\s*assert\b", code, re.M), "no assert checks a result"


@pytest.mark.parametrize("entry", CHAPTERS)
def test_code_lines_fit_the_code_box(entry):
    # the built book shows about 79 characters of a code line; the rest is cut
    long = [
        line
        for c in _notebook(entry).cells
        if c.cell_type == "code"
        for line in c.source.splitlines()
        if len(line) > 79
    ]
    assert not long, long


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_closing_sections(entry):
    cells = _notebook(entry).cells
    summary = _heading_position(cells, "Summary")
    exercises = _heading_position(cells, "Exercises")
    references = _heading_position(cells, "References")
    assert summary < exercises < references, "order: Summary, Exercises, References"
    exercises, references = exercises[0], references[0]  # cell indices
    solutions = [c for c in cells[exercises:references] if c.cell_type == "code"]
    hidden = [c for c in solutions if "hide-input" in c.metadata.get("tags", [])]
    assert len(hidden) >= 3, f"{len(hidden)} solutions tagged hide-input, need >= 3"
    assert len(hidden) == len(solutions), "tag every solution cell hide-input"
    # Solutions may also build on helpers defined earlier in the chapter, but at
    # least three must call the package directly.
    direct = [c for c in hidden if re.search(r"\bml\.|mlbook", c.source)]
    assert len(direct) >= 3, f"only {len(direct)} solutions use mlbook, need >= 3"
    rest = cells[references + 1:]
    assert rest and rest[0].cell_type == "markdown"
    assert rest[0].source.strip() == "```{footbibliography}\n```", (
        "the cell after '## References' must hold exactly the footbibliography block")


# -- references and hygiene ------------------------------------------------------------

def test_bib_keys_are_unique():
    keys = _bib_keys()
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert keys and not duplicates, f"duplicate BibTeX keys: {duplicates}"


CITE = re.compile(r"\{(?:foot)?cite(?::[a-z]+)?\}`([^`]+)`")


@pytest.mark.parametrize("path", _book_sources(), ids=lambda p: p.name)
def test_citations_exist(path):
    keys = set(_bib_keys())
    groups = CITE.findall(_text_of(path))
    used = {k.strip() for group in groups for k in group.split(",")}
    missing = sorted(used - keys)
    assert not missing, f"cited but not in book/references.bib: {missing}"


MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|tmp|root|home|Users)/|[A-Za-z]:\\Users")


@pytest.mark.parametrize("path", [*_book_sources(), ROOT / "_config.yml",
                                  ROOT / "_toc.yml"], ids=lambda p: p.name)
def test_no_machine_paths(path):
    text = _text_of(path) if path.parent == BOOK else path.read_text()
    hits = sorted({m.group(0) for m in MACHINE_PATH.finditer(text)})
    assert not hits, f"machine-specific paths in {path.name}: {hits}"


# -- the package's docstrings --------------------------------------------------------

API_PAGE = (BOOK / "api.md").read_text()
CHAPTER_NAME = re.compile(r"book/\d\d_\w+")


def _api_objects() -> list[tuple[str, str]]:
    """(dotted name, module) of what the API page documents one by one: each
    autoclass/autofunction, and each member of an automodule, the listed ones
    or, for a bare ``:members:``, every public function and class defined in
    a module whose own docstring names no chapter."""
    import importlib
    import inspect

    found = re.findall(r"\.\. auto(?:class|function):: (\S+)", API_PAGE)
    for module, options in re.findall(
        r"\.\. automodule:: (\S+)\n((?:   :.*\n)*)", API_PAGE
    ):
        listed = re.search(r":members:(.*)", options)
        names = [n.strip() for n in listed.group(1).split(",") if n.strip()]
        mod = importlib.import_module(module)
        if not names and not CHAPTER_NAME.search(mod.__doc__ or ""):
            names = [
                n
                for n, o in vars(mod).items()
                if not n.startswith("_")
                and (inspect.isfunction(o) or inspect.isclass(o))
                and o.__module__ == module
            ]
        found += [f"{module}.{n}" for n in names]
    return found


def _resolve_object(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _chapter_code() -> dict[str, str]:
    return {
        entry: "\n".join(
            c.source for c in _notebook(entry).cells if c.cell_type == "code"
        )
        for entry in CHAPTERS
    }


@pytest.mark.parametrize("dotted", _api_objects())
def test_docstring_names_the_chapter_that_introduces_it(dotted):
    # DESIGN section 8: a reader of help(...) finds the chapter to read.
    doc = _resolve_object(dotted).__doc__ or ""
    named = set(CHAPTER_NAME.findall(doc))
    assert named, f"{dotted}'s docstring names no chapter (book/NN_name)"
    assert named <= set(CHAPTERS), f"{dotted} names {named - set(CHAPTERS)}"
    # where chapters call it, it names one of them: `ml.MAML`, `zoo.load`
    short = ".".join(dotted.split(".")[-2:]) if "." in dotted[7:] else dotted
    short = short.removeprefix("mlbook.")
    callers = {
        entry
        for entry, code in _chapter_code().items()
        if re.search(rf"(?<![\w.])(?:ml\.)?{re.escape(short)}\b", code)
    }
    if callers:
        assert named & callers, f"{dotted}: named {named}, used in {callers}"


@pytest.mark.parametrize(
    "module", re.findall(r"\.\. automodule:: (\S+)", API_PAGE)
)
def test_documented_module_or_each_member_names_a_chapter(module):
    import importlib

    doc = importlib.import_module(module).__doc__ or ""
    members = [d for d in _api_objects() if d.rpartition(".")[0] == module]
    assert CHAPTER_NAME.search(doc) or members, f"{module} names no chapter"
