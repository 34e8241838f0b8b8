"""What the `relay` parser says about itself: examples in `--help`, shell completion, the man page.

All three are made from the one argparse tree `relay.cli.build_parser()` returns, so a new
command or flag shows up in each without being written twice:

* `add_examples(parser)` puts an "examples:" epilog on the main commands (EXAMPLES);
* `completion(parser, "bash" | "zsh")` is `relay completion SHELL`: lookup functions (the
  subcommands, options and option values of each command path) generated from the tree, and a
  small completer per shell that walks the words typed so far;
* `man_page(parser)` is `relay gen man`: relay(1) in roff (`man -l`, groff -man).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
from collections.abc import Iterator

from relay._version import __version__

__all__ = ["EXAMPLES", "add_examples", "completion", "man_page", "walk"]

EXAMPLES: dict[str, str] = {
    "run": """\
  relay run -c /etc/relay/relay.toml
  relay run --listen 127.0.0.1:7000 --backend 127.0.0.1:8000 --workers 2
  relay run --listen 0.0.0.0:15001 --mode tproxy --engine epoll
  RELAY_LOG_FORMAT=json relay run -c relay.toml --flow-log""",
    "check": """\
  relay check -c /etc/relay/relay.toml         # every problem: file: key: value: reason
  relay check -c relay.toml --workers 8        # with a flag applied as `run` would""",
    "config": """\
  relay config dump -c relay.toml              # effective config, defaults included
  relay config schema > relay.schema.json""",
    "stats": """\
  relay stats -c /etc/relay/relay.toml
  relay stats --socket /run/relay/admin.sock --json | jq .workers""",
    "reload": """\
  relay reload -c /etc/relay/relay.toml        # validated first; exit 1 if refused
  systemctl reload relay""",
    "sessions": """\
  relay sessions -c relay.toml
  relay sessions -c relay.toml --destination 10.0.0.0/8
  relay sessions -c relay.toml --source 192.0.2.7 --listener main --json""",
    "kill": """\
  relay kill -c relay.toml 4242-17 4243-3      # ids from `relay sessions`
  relay kill -c relay.toml --source 192.0.2.7  # only if exactly one session matches
  relay kill -c relay.toml --all --destination 203.0.113.9:443""",
    "nft": """\
  relay nft -c relay.toml                      # print the rules
  relay nft -c relay.toml --ingress eth1 --apply
  relay nft -c relay.toml --remove""",
    "doctor": """\
  relay doctor
  relay doctor -c /etc/relay/relay.toml --json""",
    "demo": """\
  relay demo                                   # loopback, then TPROXY in namespaces (root)
  relay demo --help""",
    "gen": """\
  relay gen systemd -c /etc/relay/relay.toml > /etc/systemd/system/relay.service
  relay gen man > /usr/local/share/man/man1/relay.1""",
    "completion": """\
  relay completion bash > /etc/bash_completion.d/relay
  relay completion zsh > "${fpath[1]}/_relay"     # or: source <(relay completion zsh)""",
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _sub_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) of the tree, the root first (path ()). `relay demo`
    passes its arguments through to relay.demo: its own parser stands in for it here."""
    if path == ("demo",):
        from relay.demo import _parser as demo_parser

        parser = demo_parser()
    yield path, parser
    for name, sub in _subparsers(parser).items():
        yield from walk(sub, (*path, name))


def add_examples(parser: argparse.ArgumentParser) -> None:
    """An "examples:" epilog on each command of EXAMPLES (kept as written: raw formatter)."""
    subs = _subparsers(parser)
    for name, text in EXAMPLES.items():
        sub = subs.get(name)
        if sub is not None:
            sub.epilog = "examples:\n" + text
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("run `relay COMMAND --help` for a command's options and examples; "
                     "`relay completion bash|zsh` for shell completion")


# ---------------------------------------------------------------------- completion

_FILE_HINTS = ("FILE", "PATH")


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _value_word(action: argparse.Action) -> str:
    """What completes the value of an option: its choices, @file, @any (free text), @none."""
    if not _takes_value(action):
        return "@none"
    if action.choices:
        return " ".join(str(c) for c in action.choices)
    metavar = str(action.metavar or action.dest).upper()
    if any(hint in metavar for hint in _FILE_HINTS):
        return "@file"
    return "@any"


def _case(fn: str, entries: list[tuple[str, str]]) -> list[str]:
    lines = [f"_relay_{fn}() {{", '    case "$1" in']
    for key, value in entries:
        pattern = shlex.quote(key) if key else '""'
        lines.append(f"        {pattern}) echo {shlex.quote(value)} ;;")
    lines += ["    esac", "}"]
    return lines


def _tables(parser: argparse.ArgumentParser) -> list[str]:
    subcommands, options, positionals, values = [], [], [], []
    for path, p in walk(parser):
        key = " ".join(path)
        subs = _subparsers(p)
        if subs:
            subcommands.append((key, " ".join(subs)))
        opts: list[str] = []
        pos: list[str] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if action.option_strings:
                opts.extend(action.option_strings)
                word = _value_word(action)
                for flag in action.option_strings:
                    if word != "@none":
                        values.append((f"{key} {flag}".strip(), word))
            elif action.choices:
                pos.extend(str(c) for c in action.choices)
        options.append((key, " ".join(opts)))
        if pos:
            positionals.append((key, " ".join(pos)))
    return (_case("subcommands", subcommands) + _case("options", options)
            + _case("positionals", positionals) + _case("values", values))


_BASH = r"""
_relay() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" cmdpath="" w i values
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        if [[ "$w" != -* && " $(_relay_subcommands "$cmdpath") " == *" $w "* ]]; then
            cmdpath="${cmdpath:+$cmdpath }$w"
        fi
    done
    if ((COMP_CWORD > 1)); then prev="${COMP_WORDS[COMP_CWORD-1]}"; fi
    if [[ "$prev" == -* ]]; then
        values="$(_relay_values "${cmdpath:+$cmdpath }$prev")"
        case "$values" in
            "" | @none) ;;
            @file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            @any) COMPREPLY=(); return ;;
            *) COMPREPLY=($(compgen -W "$values" -- "$cur")); return ;;
        esac
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$(_relay_options "$cmdpath")" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$(_relay_subcommands "$cmdpath") $(_relay_positionals "$cmdpath")" -- "$cur"))
    fi
}
complete -F _relay relay
"""

_ZSH = r"""
_relay() {
    local cur="${words[CURRENT]}" prev="" cmdpath="" w i values
    local -a subs
    for ((i = 2; i < CURRENT; i++)); do
        w="${words[i]}"
        subs=(${=$(_relay_subcommands "$cmdpath")})
        if [[ "$w" != -* && ${subs[(Ie)$w]} -gt 0 ]]; then
            cmdpath="${cmdpath:+$cmdpath }$w"
        fi
    done
    (( CURRENT > 2 )) && prev="${words[CURRENT-1]}"
    if [[ "$prev" == -* ]]; then
        values="$(_relay_values "${cmdpath:+$cmdpath }$prev")"
        case "$values" in
            "" | @none) ;;
            @file) _files; return ;;
            @any) return 1 ;;
            *) compadd -- ${=values}; return ;;
        esac
    fi
    if [[ "$cur" == -* ]]; then
        compadd -- ${=$(_relay_options "$cmdpath")}
    else
        compadd -- ${=$(_relay_subcommands "$cmdpath")} ${=$(_relay_positionals "$cmdpath")}
    fi
}
if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then
    _relay "$@"
else
    compdef _relay relay
fi
"""


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell` ("bash" or "zsh")."""
    if shell not in ("bash", "zsh"):
        raise ValueError(f"completion: unknown shell {shell!r}: expected bash or zsh")
    head = ["#compdef relay"] if shell == "zsh" else []
    head.append(f"# {shell} completion for relay {__version__}, generated by "
                f"`relay completion {shell}` from relay's argument parser")
    return "\n".join(head + _tables(parser)) + (_BASH if shell == "bash" else _ZSH)


# ---------------------------------------------------------------------- man page


def _roff(text: str) -> str:
    """Escape for roff: backslashes, hyphens; a line starting with . or ' is protected."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in out.split("\n"))


def _option_label(action: argparse.Action) -> str:
    flags = ", ".join(f"\\fB{_roff(f)}\\fR" for f in action.option_strings)
    if _takes_value(action):
        meta = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices
            else action.dest.upper())
        flags += f" \\fI{_roff(str(meta))}\\fR"
    return flags


def _help_text(action: argparse.Action) -> str:
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    params = {**vars(action), "prog": "relay"}
    if "%(" in text:
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    return text


def man_page(parser: argparse.ArgumentParser) -> str:
    """relay(1) in roff, from the parser: synopsis, one section per command with its options
    and examples."""
    date = datetime.date.today().isoformat()
    lines = [
        f'.TH RELAY 1 "{date}" "relay {__version__}" "User Commands"',
        ".SH NAME",
        "relay \\- " + _roff(parser.description or "transparent TCP relay"),
        ".SH SYNOPSIS",
        ".B relay",
        ".I COMMAND",
        "[\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _roff("Every [relay] setting of the config file is also a flag of run, check and config "
              "dump (--connect-timeout 2) and an environment variable (RELAY_CONNECT_TIMEOUT=2); "
              "the command line wins over the environment, which wins over the file. Bad "
              "arguments print one line on stderr and exit 2."),
        ".SH COMMANDS",
    ]
    helps: dict[tuple[str, ...], str] = {}
    for path, p in walk(parser):
        for name, text in _sub_help(p).items():
            helps[(*path, name)] = text
    for path, p in walk(parser):
        if not path or _subparsers(p):
            continue
        lines.append(".SS " + _roff(" ".join(("relay", *path))))
        if helps.get(path):
            lines.append(_roff(helps[path][:1].upper() + helps[path][1:] + "."))
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            text = _help_text(action)
            if action.option_strings:
                label = _option_label(action)
            else:
                label = f"\\fI{_roff(str(action.metavar or action.dest).upper())}\\fR"
            lines += [".TP", label, _roff(text) if text else ""]
        top = path[0]
        if len(path) == 1 and top in EXAMPLES:
            lines += [".PP", "Examples:", ".PP", ".nf", ".RS", _roff(EXAMPLES[top]), ".RE",
                      ".fi"]
    for name in EXAMPLES:
        if name in _subparsers(parser) and _subparsers(_subparsers(parser)[name]):
            lines += [".SS " + _roff(f"relay {name} examples"), ".nf", _roff(EXAMPLES[name]),
                      ".fi"]
    lines += [
        ".SH EXIT STATUS",
        "0 success, 1 failure (the reason on stderr), 2 bad arguments.",
        ".SH FILES",
        ".TP",
        "\\fI/etc/relay/relay.toml\\fR",
        _roff("the config `relay gen systemd` runs with, and where stats, reload, sessions and "
              "kill look for the admin socket without -c or --socket"),
        ".SH SEE ALSO",
        ".BR nft (8),",
        ".BR systemd.service (5),",
        ".BR splice (2),",
        ".BR io_uring (7)",
    ]
    return "\n".join(lines) + "\n"
