"""What the `relay` parser says about itself: examples in every main command's --help, shell
completion scripts (valid bash, every command and flag, completing for real in bash), and a man
page that renders (groff / man -l)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import relay_cli

from relay import cli, cli_docs

MAIN_COMMANDS = ("run", "check", "stats", "reload", "sessions", "kill", "nft", "doctor", "demo",
                 "gen", "completion")


def _paths() -> list[tuple[str, ...]]:
    return [path for path, _ in cli_docs.walk(cli.build_parser()) if path]


@pytest.mark.parametrize("command", MAIN_COMMANDS)
def test_help_shows_examples(command: str) -> None:
    res = relay_cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "examples:\n  relay " + command in res.stdout, res.stdout


def test_bash_completion_is_valid_and_names_every_command_and_flag(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    res = relay_cli("completion", "bash")
    assert res.returncode == 0, res.stderr
    script = tmp_path / "relay.bash"
    script.write_text(res.stdout)
    check = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for path in _paths():
        assert f" {path[-1]} " in f" {res.stdout.replace(chr(39), ' ')} ", path
    for flag in ("--destination", "--source", "--listener", "--all", "--engine", "--ingress"):
        assert flag in res.stdout

    def complete(*words: str) -> list[str]:
        probe = (f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
                 'COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _relay; printf "%s\\n" "${COMPREPLY[@]}"')
        out = subprocess.run([bash, "-c", probe], capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("relay", "se") == ["sessions"]
    assert set(complete("relay", "")) >= set(MAIN_COMMANDS)
    assert complete("relay", "gen", "") == ["systemd", "man"]
    assert complete("relay", "run", "--engine", "") == ["auto", "uring", "epoll", "asyncio"]
    assert complete("relay", "kill", "--al") == ["--all"]
    assert complete("relay", "completion", "") == ["bash", "zsh"]
    assert complete("relay", "check", "-c", str(script)[:-2]) == [str(script)]


def test_zsh_completion_names_every_command() -> None:
    res = relay_cli("completion", "zsh")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#compdef relay\n") and "compdef _relay relay" in res.stdout
    for path in _paths():
        assert path[-1] in res.stdout, path
    zsh = shutil.which("zsh")
    if zsh is not None:
        check = subprocess.run([zsh, "-n"], input=res.stdout, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_man_page_renders(tmp_path: Path) -> None:
    page = tmp_path / "relay.1"
    res = relay_cli("gen", "man", "-o", str(page))
    assert res.returncode == 0, res.stderr
    text = page.read_text()
    assert text.startswith(".TH RELAY 1 ")
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    out = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-P-cbou", str(page)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and not out.stderr, out.stderr
    rendered = out.stdout
    for path in _paths():
        if not cli_docs._subparsers(dict(cli_docs.walk(cli.build_parser()))[path]):
            assert "relay " + " ".join(path) in rendered, path
    assert "--destination" in rendered.replace("\u2010", "-") and "Examples:" in rendered
    if shutil.which("man"):
        man = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                             timeout=30, env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin"})
        assert man.returncode == 0 and "relay sessions" in man.stdout, man.stderr
