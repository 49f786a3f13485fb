"""Project wiring: CI runs the README's test command and lints; the documentation the code
cites is in the repository; the packages it imports are declared."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lipcert", "attacks", "reports")
SCANNED = (*PACKAGES, "tests", "benchmarks")
# Spelled in two parts so that this file does not match itself.
OUTSIDE_DOCS = ("DESIGN" + ".md", "../" + "shared")
DOC_REFERENCE = re.compile(r'docs/([\w./-]+\.md)((?:, "[^"]+")*)')


def _files(folders: tuple[str, ...]) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def _headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in page.read_text().splitlines()
            if line.startswith("#")}


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick_start.strip().splitlines()]
    assert len(commands) == 2, commands
    test_command = next(c for c in commands if re.search(r"\btest\b", c))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, (test_command, ci_lines)


def test_ci_lints_after_the_tests() -> None:
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ".venv/bin/ruff check ." in ci_lines
    assert ci_lines.index(".venv/bin/ruff check .") > ci_lines.index("./run.sh test")


def test_no_file_points_outside_the_repository_for_documentation() -> None:
    offenders = [f"{p.relative_to(ROOT)}: {needle}" for p in _files(SCANNED)
                 for needle in OUTSIDE_DOCS if needle.encode() in p.read_bytes()]
    assert not offenders, "cite docs/*.md instead:\n" + "\n".join(offenders)


def test_every_cited_docs_page_and_section_exists() -> None:
    """References ``docs/<page>.md`` and ``docs/<page>.md, "<section>", …`` in the code, and
    the docs' own relative links, must name pages and headings that exist."""
    cited: list[tuple[str, Path, list[str]]] = []
    for p in _files((*SCANNED, "docs")):
        if p.suffix not in (".py", ".md", ".sh", ".toml"):
            continue
        text = " ".join(p.read_text().split())  # references may wrap over lines
        for page, sections in DOC_REFERENCE.findall(text):
            cited.append((str(p.relative_to(ROOT)), ROOT / "docs" / page,
                          re.findall(r'"([^"]+)"', sections)))
        if p.parent == ROOT / "docs":
            cited += [(str(p.relative_to(ROOT)), p.parent / link, [])
                      for link in re.findall(r"\]\(([\w./-]+\.md)\)", text)]
    assert len({str(page) for _, page, _ in cited}) >= 3, cited
    missing = [f"{where}: {page.relative_to(ROOT)}" for where, page, _ in cited
               if not page.is_file()]
    assert not missing, "cited pages that do not exist:\n" + "\n".join(missing)
    unknown = [f'{where}: {page.relative_to(ROOT)}, "{s}"' for where, page, sections in cited
               for s in sections if s not in _headings(page)]
    assert not unknown, "cited sections that are not headings:\n" + "\n".join(unknown)


def test_every_imported_package_is_a_declared_dependency() -> None:
    """The packages lipcert, attacks and reports import are core dependencies in
    pyproject.toml (as installed: ``./run.sh`` reinstalls when pyproject.toml changes)."""
    declared = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in requires("lipcert") or [] if "extra ==" not in r}
    distributions = packages_distributions()
    imported: dict[str, str] = {}
    for p in _files(PACKAGES):
        if p.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PACKAGES:
                    imported.setdefault(top, str(p.relative_to(ROOT)))
    assert {"torch", "torchattacks", "pandas"} <= set(imported)
    undeclared = [f"{module} ({where})" for module, where in sorted(imported.items())
                  if not {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                  & declared]
    assert not undeclared, "imported but not a core dependency: " + ", ".join(undeclared)
