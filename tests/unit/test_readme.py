"""The README's commands run as written: every `imgalign ...` line in its shell code blocks names a real
subcommand, parses with the real argument parser, names a registered recipe, and its `--config FILE` exists and
loads with the line's `key=value` overrides (the same `load_config` call `imgalign train` makes).

How lines are read: fenced blocks tagged bash, sh, shell, console or untagged; `\\` continuations joined; `#`
comments dropped; `&&`, `||`, `;` and `|` split commands. An imgalign command is `imgalign ...`,
`.venv/bin/imgalign ...` or `... -m imgalign.cli ...` (accelerate launch, torchrun).

Placeholders: a value the user must supply is written `<like this>`; arguments containing `<` are not loaded
(the rest of the line still is). Paths under `outputs/` are written by earlier commands of the README (the demo's
pairs, a trained LoRA): configs load in a scratch folder that mirrors the repository (configs/, assets/) where
those paths exist as empty files, so the check covers everything except their contents.

Also: no absolute machine path or `../shared` in README.md, docs/results.md or configs/, and every shipped config
appears in the README.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from imgalign.cli import build_parser
from imgalign.config import load_config
from imgalign.errors import UserError
from imgalign.recipes import RECIPES, get_recipe

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHELL_TAGS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|"}
FORBIDDEN = ("/tmp/", "/work/", "/root/", "/home/", "../shared")


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every shell code block line, continuations joined, prompts stripped."""
    out: list[tuple[int, str]] = []
    in_block, tag, pending, start = False, "", "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", raw)
        if fence:
            in_block, tag, pending = (not in_block), fence.group(1).lower(), ""
            continue
        if not in_block or tag not in SHELL_TAGS:
            continue
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line:
            out.append((start, line))
    return out


def split_commands(line: str) -> list[list[str]]:
    tokens = shlex.split(line, comments=True)
    commands, current = [], []
    for tok in tokens:
        if tok in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    return [c for c in commands if c]


def imgalign_args(tokens: list[str]) -> list[str] | None:
    """The arguments after the imgalign entry point, or None if this command does not run imgalign."""
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "imgalign.cli":
            return tokens[i + 2:]
        if Path(tok).name == "imgalign" and "=" not in tok:
            return tokens[i + 1:]
    return None


def parse_like_the_cli(args: list[str]):
    """imgalign.cli._run's parsing: known arguments, then `key=value` extras of `train` appended to overrides."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(args)
    if extra and ns.command == "train":
        bad = [e for e in extra if e.startswith("-") or "=" not in e]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        ns.overrides = list(ns.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


def readme_commands() -> list[tuple[int, str, list[str]]]:
    found = []
    for n, line in shell_lines(README.read_text(encoding="utf-8")):
        for tokens in split_commands(line):
            args = imgalign_args(tokens)
            if args is not None:
                found.append((n, line, args))
    return found


def other_commands() -> list[tuple[int, list[str]]]:
    """`python scripts/X.py ...` and `python -m module ...` lines (not imgalign.cli)."""
    found = []
    for n, line in shell_lines(README.read_text(encoding="utf-8")):
        for tokens in split_commands(line):
            if tokens and Path(tokens[0]).name.startswith("python") and imgalign_args(tokens) is None:
                found.append((n, tokens))
    return found


COMMANDS = readme_commands()


def test_readme_has_commands_for_every_recipe():
    trained = {args[1] for _, _, args in COMMANDS if len(args) > 1 and args[0] == "train"}
    assert set(RECIPES) <= trained, f"recipes without a README command: {set(RECIPES) - trained}"
    subcommands = {args[0] for _, _, args in COMMANDS if args}
    assert {"train", "generate", "score"} <= subcommands


def _mirror_repository(tmp: Path, values: list[str]) -> None:
    """A scratch working folder: configs/ and assets/ of the repository, plus the outputs/ paths the line reads."""
    for name in ("configs", "assets"):
        (tmp / name).symlink_to(ROOT / name, target_is_directory=True)
    for value in values:
        if value.startswith("outputs/"):
            path = tmp / value
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)


def _check_repository_paths(values: list[str], where: str) -> None:
    for value in values:
        if value.startswith(("assets/", "configs/", "scripts/", "docs/")) and "<" not in value:
            assert (ROOT / value).exists(), f"{where}: {value} does not exist in the repository"


@pytest.mark.parametrize("lineno,line,args", COMMANDS, ids=[f"README:{n}" for n, _, _ in COMMANDS])
def test_readme_command(lineno, line, args, tmp_path, monkeypatch):
    where = f"README.md line {lineno}: {line}"
    assert args, f"{where}: imgalign without a subcommand"
    if "-h" in args or "--help" in args:
        return
    try:
        ns = parse_like_the_cli(args)
    except SystemExit as e:
        pytest.fail(f"{where}: the command line does not parse (exit {e.code})")
    values = [a.split("=", 1)[1] if "=" in a else a for a in args]
    _check_repository_paths(values, where)
    if ns.command != "train":
        return
    try:
        recipe = get_recipe(ns.method)
    except (SystemExit, UserError) as e:
        pytest.fail(f"{where}: {e}")
    if ns.help_config:
        return
    if ns.config:
        assert (ROOT / ns.config).is_file(), f"{where}: config file {ns.config} does not exist"
    # <placeholders> are the user's to supply: a stand-in file of the same suffix takes their place
    overrides = [o if "<" not in o else f"{o.split('=', 1)[0]}=outputs/placeholder{Path(o.strip('<>')).suffix}"
                 for o in ns.overrides]
    read = [o.split("=", 1)[1] for o in overrides if "=" in o]
    if ns.config:  # the config's own outputs/ paths (written by an earlier README command) count too
        from omegaconf import OmegaConf

        leaves = OmegaConf.to_container(OmegaConf.load(ROOT / ns.config))
        stack = [leaves]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str):
                read.append(node)
    _mirror_repository(tmp_path, read)
    monkeypatch.chdir(tmp_path)
    load_config(recipe.Config, ns.config, overrides)


OTHER = other_commands()


@pytest.mark.parametrize("lineno,tokens", OTHER, ids=[f"README:{n}" for n, _ in OTHER])
def test_readme_python_command(lineno, tokens):
    where = f"README.md line {lineno}: {' '.join(tokens)}"
    if "-m" in tokens:
        module = tokens[tokens.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    else:
        script = next((t for t in tokens[1:] if t.endswith(".py")), None)
        assert script and (ROOT / script).is_file(), f"{where}: no script {script}"


def test_every_repository_path_named_in_the_readme_exists():
    """Prose and tables too: configs/..., scripts/..., assets/..., docs/..., tests/..., imgalign/... (globs must match)."""
    text = README.read_text(encoding="utf-8")
    paths = {m.rstrip(".,;:)") for m in re.findall(r"(?<![\w./-])((?:configs|scripts|assets|docs|tests|imgalign)/[\w./*-]+)", text)}
    assert any(p.startswith("scripts/") for p in paths) and any(p.startswith("configs/") for p in paths)
    for rel in sorted(paths):
        found = list(ROOT.glob(rel)) if "*" in rel else [ROOT / rel] if (ROOT / rel).exists() else []
        assert found, f"README.md names {rel}, which does not exist in the repository"


def test_every_shipped_config_is_in_the_readme():
    text = README.read_text(encoding="utf-8")
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        rel = path.relative_to(ROOT).as_posix()
        assert rel in text or f"`{path.name}`" in text or f"`{path.stem}`" in text, f"README.md does not mention {rel}"


@pytest.mark.parametrize("name", ["README.md", "docs/results.md", "configs", "imgalign/assets/toy/README.md", "CHANGELOG.md"])
def test_no_machine_paths(name):
    target = ROOT / name
    files = sorted(target.rglob("*.yaml")) if target.is_dir() else [target]
    assert files
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for bad in FORBIDDEN:
                assert bad not in line, f"{path.relative_to(ROOT)}:{n} contains {bad!r}: {line.strip()}"


def test_shell_line_reader_joins_continuations_and_skips_other_blocks():
    text = "x\n```bash\nimgalign train a \\\n    k=v  # note\n```\n```python\nimgalign no\n```\n```\nmake demo\n```\n"
    assert shell_lines(text) == [(3, "imgalign train a k=v  # note"), (10, "make demo")]
    assert split_commands("python -m m --out o && imgalign train x k=v  # c") == [
        ["python", "-m", "m", "--out", "o"], ["imgalign", "train", "x", "k=v"]]
    assert imgalign_args(["torchrun", "--nproc_per_node", "2", "-m", "imgalign.cli", "train", "x"]) == ["train", "x"]
    assert imgalign_args(["OMP_NUM_THREADS=1", ".venv/bin/imgalign", "env"]) == ["env"]
    assert imgalign_args(["pip", "install", "imgalign[datasets]"]) is None
