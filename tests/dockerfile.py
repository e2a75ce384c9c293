"""A small Dockerfile reader for the deployment tests (stages, instructions, ENV, exec forms)."""

from __future__ import annotations

import fnmatch
import json
import shlex
from dataclasses import dataclass, field


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                out[key] = value
        return out

    def exec_form(self, keyword: str) -> list[str] | None:
        found = self.all(keyword)
        if not found:
            return None
        value = json.loads(found[-1])
        assert isinstance(value, list), f"{keyword} must use the exec (JSON array) form"
        return value


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def stages(text: str) -> list[Stage]:
    result: list[Stage] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(words[0], name))
        else:
            assert result, f"{keyword} before FROM"
            result[-1].instructions.append((keyword, args))
    return result


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """Options (--interval=...) and the exec-form command of the stage's HEALTHCHECK."""
    (args,) = stage.all("HEALTHCHECK")
    options = {}
    while args.startswith("--"):
        opt, _, args = args.partition(" ")
        k, _, v = opt[2:].partition("=")
        options[k] = v
        args = args.strip()
    assert args.startswith("CMD "), "HEALTHCHECK CMD [...]"
    command = json.loads(args[4:])
    assert isinstance(command, list), "HEALTHCHECK CMD must use the exec form"
    return options, command


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    included = True
    for p in patterns:
        negate = p.startswith("!")
        p = p[1:] if negate else p
        p = p.rstrip("/")
        if p == "**" or fnmatch.fnmatch(path, p) or path.startswith(p + "/") or fnmatch.fnmatch(path, p + "/*"):
            included = negate
    return included


def read_dockerignore(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
