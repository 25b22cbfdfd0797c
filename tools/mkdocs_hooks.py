"""MkDocs hooks: pages generated from the repository at build time, so they cannot go stale.

- `results/<name>.md`: every measurement file in benchmarks/results/ (the data lives there, next to
  the benchmarks that write it), plus `results/index.md` listing them.
- Links are written as repository paths relative to the Markdown file, so they work on GitHub too
  (`../../benchmarks/results/x.md` from docs/<dir>/); links into benchmarks/results/ or to
  CHANGELOG.md are rewritten to the generated pages.
- `changelog.md`: CHANGELOG.md at the repository root.
- The `<!-- dgclip-cli-help -->` marker: replaced by the argparse help of `dgclip` and of each
  subcommand, rendered from `dgclip.cli.build_parser()` (needs dgclip's dependencies installed).
- A check that every name in `dgkernels.__all__` (read statically from dgkernels/__init__.py) has
  a `::: dgkernels.<name>` entry in the API pages: a new public op without reference docs is a
  warning, so `mkdocs build --strict` fails.
"""
from __future__ import annotations

import argparse
import ast
import logging
import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.dgdocs")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLI_MARKER = "<!-- dgclip-cli-help -->"
_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\s+\"[^\"]*\")?\)")
_API_ENTRY = re.compile(r"^:::\s+dgkernels\.(\w+)\s*$", re.M)
_documented: set[str] = set()


def _results_files() -> list[Path]:
    return sorted(p for p in RESULTS.iterdir() if p.is_file() and p.suffix in (".md", ".json"))


def _results_index() -> str:
    lines = ["# Results files", "",
             "Every measurement is kept in `benchmarks/results/` with its date, machine and command; "
             "these pages are generated from those files at build time.", ""]
    for p in _results_files():
        title = p.name
        if p.suffix == ".md":
            first = next((ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.startswith("# ")), "")
            title = first[2:].strip() or p.name
            lines.append(f"- [{title}]({p.name}) (`benchmarks/results/{p.name}`)")
        else:
            lines.append(f"- [`{p.name}`]({p.name}) (raw data)")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    for p in _results_files():
        if p.suffix == ".md":
            files.append(File.generated(config, f"results/{p.name}", abs_src_path=str(p)))
        else:
            files.append(File.generated(config, f"results/{p.name}", content=p.read_bytes()))
    files.append(File.generated(config, "results/index.md", content=_results_index()))
    changelog = ROOT / "CHANGELOG.md"
    if changelog.exists():
        files.append(File.generated(config, "changelog.md", abs_src_path=str(changelog)))
    return files


def _repo_path(src_uri: str) -> str:
    """Where the page's Markdown lives in the repository."""
    if src_uri == "changelog.md":
        return "CHANGELOG.md"
    if src_uri.startswith("results/"):
        return "benchmarks/results/" + src_uri[len("results/"):]
    return "docs/" + src_uri


def _site_path(repo_path: str) -> str | None:
    """The docs-relative path of a repository file that the site contains, else None."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    if repo_path.startswith("benchmarks/results/"):
        return "results/" + repo_path[len("benchmarks/results/"):]
    if repo_path == "CHANGELOG.md":
        return "changelog.md"
    return None


def _rewrite_repo_links(markdown: str, src_uri: str) -> str:
    """Links are written as repository paths relative to the Markdown file (so they work on GitHub);
    the site places results files and the changelog elsewhere, so such links are rewritten to the
    generated pages. Links to files the site does not contain are left alone (strict mode fails)."""
    real_dir = posixpath.dirname(_repo_path(src_uri))
    site_dir = posixpath.dirname(src_uri)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        site = _site_path(posixpath.normpath(posixpath.join(real_dir, target)))
        if site is None:
            return m.group(0)
        new = posixpath.relpath(site, site_dir or ".")
        return f"{m.group(1)}{new}{m.group(3) or ''}{m.group(4) or ''})"

    return _LINK.sub(fix, markdown)


def _find_subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse exposes subcommands only through this attribute
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _render_cli() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for a stable page
    try:
        try:
            from dgclip.cli import build_parser

            parser = build_parser()
        except Exception as exc:  # noqa: BLE001 - whatever fails, this build has no CLI reference
            log.warning("dgclip CLI reference not rendered: building dgclip's parser failed (%r); "
                        "install the package with its dgclip extra", exc)
            return "*The CLI reference could not be rendered in this build.*\n"
        out = ["```text", parser.format_help().rstrip(), "```", ""]
        sub = _find_subparsers(parser)
        for name, child in (sub.choices.items() if sub else ()):
            out += [f"### `dgclip {name}`", "", "```text", child.format_help().rstrip(), "```", ""]
            nested = _find_subparsers(child)
            for nname, nchild in (nested.choices.items() if nested else ()):
                out += [f"#### `dgclip {name} {nname}`", "", "```text", nchild.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    markdown = _rewrite_repo_links(markdown, src)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, _render_cli())
    if src.startswith("api/"):
        _documented.update(_API_ENTRY.findall(markdown))
    return markdown


def _public_names() -> list[str]:
    """dgkernels.__all__, read from the source (`__all__ = [...]` and `__all__ += [...]`)."""
    tree = ast.parse((ROOT / "dgkernels" / "__init__.py").read_text(encoding="utf-8"))
    names: list[str] = []
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "__all__" and isinstance(node, (ast.Assign, ast.AugAssign)):
            names += [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return names


def on_env(env, config, files):
    missing = [n for n in _public_names() if n not in _documented]
    if missing:
        log.warning("public dgkernels names without an API entry (add `::: dgkernels.<name>` to a "
                    "page under docs/api/): %s", ", ".join(missing))
    return env
