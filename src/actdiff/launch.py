"""``actdiff run [snakemake arguments]``: the documented way to start the workflow.

It checks every ``--configfile`` argument, starts the run's warm process (actdiff.warm: the script jobs run in
forks of it, with their libraries loaded), then replaces itself with ``python -m snakemake`` with the arguments
unchanged. Snakemake reads config files in its command-line layer, before the Snakefile runs, so the workflow
cannot improve two of its messages:

- a YAML syntax error is reported as "Config file is not valid JSON or YAML", without the file or the line;
  here it names both (actdiff.config.read_config_file);
- ``--configfile`` takes every following argument up to the next option, so a target written after it
  (``--configfile my.yaml results/reports/index.html``) is read as a config file and ends in a
  FileNotFoundError traceback; here such an argument is named as a likely target, with the command that puts
  targets before ``--configfile``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from .config import read_config_file
from .errors import ConfigError

CONFIG_FLAGS = ("--configfile", "--configfiles")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_RULE_RE = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.MULTILINE)


def config_file_args(argv: list[str]) -> list[tuple[int, str]]:
    """(position, value) of every argument Snakemake takes as a config file: ``--configfile=F`` is one file,
    ``--configfile F G ...`` every argument up to the next option (argparse's nargs="+")."""
    found, taking = [], False
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in CONFIG_FLAGS:
            taking = not eq
            if eq:
                found.append((i, value))
        elif a.startswith("-"):
            taking = False
        elif taking:
            found.append((i, a))
    return found


def rule_names(workdir: str | Path = ".") -> set[str]:
    """The workflow's rule names (a rule name is a valid Snakemake target too)."""
    d = Path(workdir)
    files = [d / "Snakefile", *sorted((d / "workflow" / "rules").glob("*.smk"))]
    return {m for f in files if f.is_file() for m in _RULE_RE.findall(f.read_text(encoding="utf-8"))}


def _looks_like_target(value: str, rules: set[str]) -> bool:
    """Not a config file, most likely a target: a rule name, or a path that is not YAML/JSON."""
    return value in rules or not value.lower().endswith(CONFIG_SUFFIXES)


def _targets_first(argv: list[str], targets: list[int]) -> str:
    """The same command with the misplaced targets moved before the first config option."""
    first = min(i for i, a in enumerate(argv) if a.partition("=")[0] in CONFIG_FLAGS)
    moved = [argv[i] for i in targets]
    rest = [a for i, a in enumerate(argv) if i not in targets]
    return shlex.join(["actdiff", "run", *rest[:first], *moved, *rest[first:]])


def check_config_args(argv: list[str], workdir: str | Path = ".") -> None:
    """Raise ConfigError naming the file (and line) of a config file Snakemake could not read, or the
    arguments after ``--configfile`` that are targets rather than config files."""
    rules = rule_names(workdir)
    misplaced = []
    for i, value in config_file_args(argv):
        p = Path(workdir) / value
        if _looks_like_target(value, rules) and not (p.is_file() and _is_mapping(p)):
            misplaced.append(i)
            continue
        read_config_file(p)
    if misplaced:
        names = ", ".join(repr(argv[i]) for i in misplaced)
        raise ConfigError(
            f"{names} after --configfile would be read as config file(s) (--configfile takes every argument up "
            "to the next option), but look(s) like targets (rule names or output paths), not YAML configs. Put "
            f"targets before --configfile:\n  {_targets_first(argv, misplaced)}"
        )


def _is_mapping(p: Path) -> bool:
    try:
        read_config_file(p)
    except ConfigError:
        return False
    return True


def main(argv: list[str]) -> int:
    """Check the config arguments, then run Snakemake in this process (exec: its exit status is ours)."""
    try:
        check_config_args(argv)
    except ConfigError as e:
        print(f"actdiff run: {e}", file=sys.stderr)
        return 1
    from .warm import start

    env, _lifeline = start(argv)  # the run's warm process (actdiff.warm), alive while Snakemake holds _lifeline
    os.environ.update(env)  # Snakemake's jobs find it by this
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "snakemake", *argv])
    return 0  # pragma: no cover - execv does not return
