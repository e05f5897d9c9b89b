"""The documentation: the README and docs/ link to files and headings that exist, name only flags that the
commands have, and the benchmarks' results files are written by the benchmarks themselves."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                    if p.stem not in ("__init__", "results", "reference_loops"))
# Flags of other programs that the pages name: sbatch's (in the batch scripts' headers and in sbatch
# arguments passed through submit_best_gpu.sh), pip's, pytest's, tensorboard's, and those of the shell scripts in slurm/ and
# the root.
EXTERNAL_FLAGS = {
    "--gres", "--nodes", "--signal", "--requeue", "--open-mode", "--dependency", "--kill-on-invalid-dep",  # sbatch
    "--no-deps", "--dry-run",  # pip; submit_best_gpu.sh and slurm/submit_chain.sh (--dry-run, --smoke)
    "--strict-markers",  # pytest
    "--logdir",  # tensorboard
}
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
MAIN = re.compile(r"(?:main\.py|distillation_lab\.main)\s+([a-z][a-z-]*)")
BENCHMARK = re.compile(r"(?<![\w/])benchmarks\.([a-z_]+)")


def prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """The page's lines outside fenced code blocks, and its code blocks' lines (continuations joined)."""
    prose, code, fenced, pending = [], [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose.append(line)
        elif line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            code.append(pending + line)
            pending = ""
    return prose, code


def inline_code(lines: list[str]) -> list[str]:
    """The `code spans` of prose lines (a span may run over a line break)."""
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", "\n".join(lines))]


def slug(heading: str) -> str:
    """GitHub's (and MkDocs') anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", heading.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (repeated headings get -1, -2, ...)."""
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    found: dict[str, int] = {}
    result = set()
    for line in prose:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = found.get(base, 0)
            result.add(base if n == 0 else f"{base}-{n}")
            found[base] = n + 1
    return result


def links(path: Path) -> list[str]:
    """The link targets of a page, outside code."""
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_in_the_guides_contents_and_the_readme():
    index = "\n".join(links(ROOT / "docs" / "index.md"))
    readme = "\n".join(links(ROOT / "README.md"))
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert page.name in index, f"docs/index.md does not link {page.name}"
            assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@lru_cache(maxsize=None)
def main_parsers() -> dict[str, set]:
    """main.py's subcommands and the option strings of each."""
    import argparse

    from distillation_lab.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(parser._option_string_actions) for name, parser in sub.choices.items()}


@lru_cache(maxsize=None)
def help_flags(module: str, function: str = "main") -> set:
    """The flags a script's --help lists (its parser is built inside its main function)."""
    mod = importlib.import_module(module)
    run = getattr(mod, "main_", None) or getattr(mod, function)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run(["--help"])
    return set(FLAG.findall(out.getvalue()))


def commands(page: Path) -> list[tuple[str, str]]:
    """(program, the part of the command line after it) for every command the page shows: lines of code
    blocks and code spans that run main.py, a benchmark or the job table, and spans that start with a
    subcommand's name (`prune --method unstructured ...`)."""
    prose, code = prose_and_code(page.read_text(encoding="utf-8"))
    found = []
    for text in code + inline_code(prose):
        text = re.split(r"\s#|&&|;", text)[0] if text in code else text
        for match in MAIN.finditer(text):
            found.append((match.group(1), text[match.end():]))
        for match in BENCHMARK.finditer(text):
            found.append((f"benchmarks.{match.group(1)}", text[match.end():]))
        if "distillation_lab.chain" in text:
            found.append(("distillation_lab.chain", text.split("distillation_lab.chain", 1)[1]))
        first = text.split(" ", 1)
        if first[0] in main_parsers() and len(first) == 2 and not MAIN.search(text):
            found.append((first[0], first[1]))
    return found


def flags_of(program: str) -> set:
    if program in main_parsers():
        return main_parsers()[program]
    if program.startswith("benchmarks."):
        return help_flags(program) if program.split(".")[1] in BENCHMARKS else set()
    return help_flags("distillation_lab.chain")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_of_a_shown_command_exists_in_its_parser(page):
    unknown = []
    for program, rest in commands(page):
        if program.startswith("benchmarks.") and program.split(".")[1] not in BENCHMARKS:
            unknown.append(f"{program}: no such benchmark")
            continue
        unknown += [f"{program} {flag}" for flag in FLAG.findall(rest) if flag not in flags_of(program)]
    assert not unknown, f"{page.relative_to(ROOT)} names flags its commands do not have: {sorted(set(unknown))}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_named_anywhere_exists_somewhere(page):
    """A flag named in prose (`--fit-sweeps` >= 1) without its command must still be a flag of main.py, a
    benchmark, the job table or one of the external programs the pages name."""
    known = set().union(*main_parsers().values(), *(help_flags(f"benchmarks.{b}") for b in BENCHMARKS),
                        help_flags("distillation_lab.chain"), EXTERNAL_FLAGS)
    prose, code = prose_and_code(page.read_text(encoding="utf-8"))
    named = {flag for text in code + inline_code(prose) for flag in FLAG.findall(text)}
    assert not named - known, f"{page.relative_to(ROOT)} names unknown flags: {sorted(named - known)}"


def test_the_results_writer_writes_the_command_date_machine_and_versions(tmp_path):
    from benchmarks.results import write_results

    path = write_results("clos_speed", ["device cpu", "| a | b |", "|---|---|", "| 1 | 2 |"],
                         ["--repeats", "3", "--shapes", "8x8:4"], tmp_path, seconds=75)
    text = path.read_text()
    assert path == tmp_path / "clos_speed.md"
    assert "| command | `python -m benchmarks.clos_speed --repeats 3 --shapes 8x8:4` |" in text
    assert re.search(r"\| date \| \d{4}-\d\d-\d\d \d\d:\d\d UTC \|", text)
    assert "| took | 1 min 15 s |" in text
    assert re.search(r"\| machine \| .*\d+ cores.*GPU: ", text)
    assert "| load | 1-minute load average" in text or "| load | unknown |" in text
    assert re.search(r"\| code \| [0-9a-f]{7,}|\| code \| unknown", text)
    assert re.search(r"\| python \| 3\.\d+", text) and re.search(r"\| torch \| \d", text)
    # The printed table stays a Markdown table; other printed lines stay as printed, in a text block.
    assert "```text\ndevice cpu\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n" in text
    # A run whose code changed under it names the code it imported at its start, then the code at writing.
    path = write_results("clos_speed", ["| a |", "|---|"], [], tmp_path, code_at_start="0123abc")
    assert re.search(r"\| code \| 0123abc when it started \(([0-9a-f]{7,}|unknown).* when written\) \|", path.read_text())


def test_a_benchmark_writes_its_table_with_write_results(tmp_path, capsys):
    from benchmarks import clos_speed

    clos_speed.main(["--device", "cpu", "--shapes", "8x8:4", "--multipliers", "2", "--repeats", "1",
                     "--write-results", str(tmp_path)])
    text = (tmp_path / "clos_speed.md").read_text()
    assert "`python -m benchmarks.clos_speed --device cpu --shapes 8x8:4 --multipliers 2 --repeats 1 --write-results" \
        in text
    assert "| 8 -> 8 | 4 | fp32 | dense |" in text and "| 8 -> 8 | 4 | fp32 | lowrank | 2 |" in text
    assert f"wrote {tmp_path / 'clos_speed.md'}" in capsys.readouterr().out


@pytest.mark.parametrize("result", sorted((ROOT / "results").glob("*.md")), ids=lambda p: p.name)
def test_every_results_file_was_written_by_its_benchmark(result):
    """results/NAME.md (or NAME_SUFFIX.md, one of several files of one benchmark) is benchmarks/NAME.py's output with
    its header, not a hand-written file."""
    text = result.read_text()
    found = re.search(r"^Written by `python -m benchmarks\.(\w+)[ `]", text, re.M)
    assert found, f"{result.name}: no 'Written by `python -m benchmarks.NAME ...`' line"
    name = found.group(1)
    assert name in BENCHMARKS and result.stem.startswith(name), f"{result.name}: no benchmarks/{name}.py"
    assert f"| command | `python -m benchmarks.{name}" in text
    assert re.search(r"\| date \| \d{4}-\d\d-\d\d", text) and "| machine |" in text and "| torch |" in text
