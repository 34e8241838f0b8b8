"""The `relay` command line: argument parsing and dispatch, nothing else.

    relay run (-c FILE | --listen HOST:PORT --backend HOST:PORT) [--workers N] [--engine E] ...
    relay check -c FILE              every problem with its key and reason; exit 0 or 1
    relay config dump|schema         effective config as TOML (defaults included) / JSON schema
    relay doctor [-c FILE] [--json]  host checks, PASS/WARN/FAIL with the fix
    relay version | relay --version
    relay nft -c FILE [--apply|--remove]    relay demo    relay stats|reload    relay gen systemd
    relay sessions [--json] [FILTERS]       relay kill ID... | relay kill [--all] FILTERS
    relay completion bash|zsh               relay gen man     (both from this parser: cli_docs)

Every ``[relay]`` setting is also a flag of run/check/config dump (``--connect-timeout 2``) and an
environment variable (``RELAY_CONNECT_TIMEOUT=2``); the command line wins over the environment,
which wins over the file.  Bad arguments print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgspec

from relay.config import (
    Config,
    ConfigError,
    dumps,
    from_dict,
    load,
    parse_hostport,
    schema,
)
from relay.config.settings import SETTINGS, Setting, parse_setting_text
from relay.ops import nft
from relay.process import systemd

__all__ = ["build_parser", "main"]

log = logging.getLogger("relay.cli")

SYSTEM_CONFIG = "/etc/relay/relay.toml"  # what `relay gen systemd` runs with by default
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- argument types


def _address_type(flag_kind: str, **parse_options: bool) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if flag_kind == "backend" and text.startswith("unix:"):
            if len(text) == len("unix:"):
                raise argparse.ArgumentTypeError(
                    f'invalid backend {text!r}: empty path after "unix:"'
                )
            return text
        try:
            parse_hostport(text, **parse_options)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid HOST:PORT {text!r}: {exc}") from None
        return text

    parse.__name__ = "HOST:PORT"
    return parse


def _setting_type(setting: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = parse_setting_text(setting, text)
            return msgspec.convert(value, type=setting.type)
        except msgspec.ValidationError as exc:  # a ValueError too: keep this clause first
            reason = str(exc).replace("`", "")
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: {reason[:1].lower()}{reason[1:]}"
            ) from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None

    parse.__name__ = setting.base_type.__name__
    return parse


def _setting_dest(setting: Setting) -> str:
    return "set_" + setting.name


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "[relay] settings", "each overrides the file and its RELAY_<NAME> environment variable"
    )
    for s in SETTINGS:
        help_text = f"{s.help} (default {s.default!r}; env {s.env})"
        if s.base_type is bool:
            group.add_argument(
                s.flag,
                dest=_setting_dest(s),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif s.choices is not None:
            group.add_argument(
                s.flag, dest=_setting_dest(s), choices=s.choices, default=None, help=help_text
            )
        else:
            group.add_argument(
                s.flag,
                dest=_setting_dest(s),
                type=_setting_type(s),
                default=None,
                metavar=s.metavar,
                help=help_text,
            )


def _add_config_source(parser: argparse.ArgumentParser, *, listen: bool = True) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
    if listen:
        parser.add_argument(
            "--listen",
            metavar="HOST:PORT",
            type=_address_type("listen", allow_port_zero=True),
            help='without -c: one listener on this address ("[::1]:7000" for IPv6)',
        )
        parser.add_argument(
            "--backend",
            metavar="HOST:PORT",
            type=_address_type("backend", allow_hostname=True),
            help="without -c: relay every connection to this backend (or unix:/path)",
        )
        parser.add_argument(
            "--mode",
            choices=("backend", "tproxy", "redirect"),
            default=None,
            help="without -c: listener mode (default backend)",
        )
    _add_setting_flags(parser)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="relay",
        description="Transparent TCP relay with a zero-copy core (io_uring + splice).",
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print relay, Python, Cython, liburing, kernel and engine availability",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="run the relay")
    _add_config_source(p)
    p.set_defaults(handler=cmd_run, parser=p)

    p = sub.add_parser("check", help="validate a config: every problem, exit 0 or 1")
    _add_config_source(p)
    p.set_defaults(handler=cmd_check, parser=p)

    p = sub.add_parser("config", help="show the effective config or its schema")
    config_sub = p.add_subparsers(dest="config_command", metavar="WHAT", parser_class=_Parser)
    config_sub.required = True
    q = config_sub.add_parser("dump", help="effective config as TOML, defaults included")
    _add_config_source(q)
    q.add_argument("--no-comments", action="store_true", help="leave out the help comments")
    q.set_defaults(handler=cmd_config_dump, parser=q)
    q = config_sub.add_parser("schema", help="JSON schema of the config file")
    q.set_defaults(handler=cmd_config_schema, parser=q)

    p = sub.add_parser("doctor", help="check this host: PASS/WARN/FAIL with the fix")
    p.add_argument("-c", "--config", metavar="FILE", help="judge the host for this config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_doctor, parser=p)

    p = sub.add_parser("version", help="same as --version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_version, parser=p)

    p = sub.add_parser("nft", help="print, apply or remove the nftables rules a config needs")
    p.add_argument("-c", "--config", metavar="FILE", required=True, help="TOML config file")
    p.add_argument(
        "--ingress",
        action="append",
        default=[],
        metavar="IFACE",
        help="intercept TCP and UDP only on this interface (repeatable); replaces every "
        "listener's `ingress` key",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="install the rules and routes")
    action.add_argument("--remove", action="store_true", help="take them away again")
    p.set_defaults(handler=cmd_nft, parser=p)

    # Its options belong to relay.demo (`relay demo --help` shows them): pass everything through.
    p = sub.add_parser(
        "demo",
        help="run the demonstration (loopback, then TPROXY + soft-unicast in namespaces)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("demo_args", nargs="*", help="options of relay.demo")
    p.set_defaults(handler=cmd_demo, parser=p)

    for name, help_text in (
        ("stats", "show live counters from a running relay"),
        ("reload", "ask a running relay to reload its config (validated first)"),
        ("upgrade", "restart a running relay's binary without cutting connections "
                    "(docs/handoff.md)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", metavar="FILE", help="find the admin socket here")
        p.add_argument(
            "--socket",
            metavar="PATH",
            help="admin socket (default: relay.admin_socket of -c FILE, else of "
            f"{SYSTEM_CONFIG} if present, else $RELAY_ADMIN_SOCKET)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=cmd_admin, parser=p)

    for name, help_text in (
        ("sessions", "list the open connections of a running relay (the session table)"),
        ("kill", "reset open connections of a running relay (close reason \"killed\")"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name == "kill":
            p.add_argument("ids", nargs="*", metavar="ID",
                           help="session ids as `relay sessions` shows them (PID-N)")
        p.add_argument("-c", "--config", metavar="FILE", help="find the admin socket here")
        p.add_argument("--socket", metavar="PATH", help="admin socket (as for `relay stats`)")
        p.add_argument("--listener", metavar="NAME", help="only this listener's sessions")
        p.add_argument("--destination", metavar="ADDR",
                       help="original destination or backend: CIDR, IP, IP:PORT, [V6]:PORT, "
                       "CIDR:PORTS or unix:/path")
        p.add_argument("--source", metavar="ADDR", help="client address, same forms")
        if name == "kill":
            p.add_argument("--all", action="store_true",
                           help="kill every session the filters match (without it a filter "
                           "must match exactly one)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=cmd_admin, parser=p)

    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")
    p.set_defaults(handler=cmd_completion, parser=p)

    p = sub.add_parser("gen", help="generate deployment files")
    gen_sub = p.add_subparsers(dest="gen_command", metavar="WHAT", parser_class=_Parser)
    gen_sub.required = True
    q = gen_sub.add_parser("systemd", help="print a systemd unit for relay")
    q.add_argument(
        "-c",
        "--config-path",
        dest="config",
        metavar="FILE",
        help="config file the unit runs with",
    )
    q.set_defaults(handler=cmd_gen_systemd, parser=q)
    q = gen_sub.add_parser("man", help="print the relay(1) man page (roff), made from this parser")
    q.add_argument("-o", "--output", metavar="FILE", help="write it here instead of stdout")
    q.set_defaults(handler=cmd_gen_man, parser=q)
    from relay import cli_docs

    cli_docs.add_examples(parser)
    return parser


# --------------------------------------------------------------------------- config from args


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for s in SETTINGS:
        value = getattr(args, _setting_dest(s), None)
        if value is not None:
            out[s.name] = value
    return out


def _config_from_args(
    args: argparse.Namespace, *, check_kernel: bool, require_listener: bool = True
) -> tuple[Config, str | None]:
    """The effective config of run/check/config dump. Usage errors exit 2 via argparse."""
    parser: argparse.ArgumentParser = args.parser
    overrides = _overrides(args)
    if args.config:
        if args.listen or args.backend or args.mode:
            parser.error(
                "--listen/--backend/--mode cannot be combined with -c; put the listener in the file"
            )
        return load(args.config, check_kernel=check_kernel, overrides=overrides), args.config
    if args.backend and not args.listen:
        parser.error("--backend needs --listen HOST:PORT")
    if args.listen:
        mode = args.mode or "backend"
        if mode == "backend" and not args.backend:
            parser.error("--listen in mode backend needs --backend HOST:PORT")
        if mode != "backend" and args.backend:
            parser.error(f"--backend is only used in mode backend, not {mode}")
        listener = {"bind": args.listen, "mode": mode}
        if args.backend:
            listener["backend"] = args.backend
        cfg = from_dict(
            {"listener": [listener]},
            "command line",
            environ=os.environ,
            overrides=overrides,
            check_host=check_kernel,
        )
    else:
        if args.mode:
            parser.error("--mode needs --listen HOST:PORT")
        if require_listener:
            parser.error("give -c FILE, or --listen HOST:PORT --backend HOST:PORT")
        cfg = from_dict(
            {},
            "defaults",
            environ=os.environ,
            overrides=overrides,
            require_listener=False,
            check_host=check_kernel,
        )
    return cfg, None


def _print_problems(prog: str, exc: ConfigError) -> int:
    """Every problem on stderr, then a count. Exit 2 when a command-line flag is to blame (a bad
    argument, like argparse's own errors), else 1."""
    for line in exc.problems:
        print(line, file=sys.stderr)
    count = len(exc.problems)
    print(f"{prog}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    flag_names = {s.flag for s in SETTINGS}
    if any(line.split(": ", 1)[0] in flag_names for line in exc.problems):
        return EXIT_USAGE
    return EXIT_FAIL


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    """Validate everything (host checks included), then hand over to the supervisor, which sets
    up logging, raises RLIMIT_NOFILE to what maxconn needs (relay.process.budgets) and logs what it did or
    why it could not, binds, and forks the workers."""
    try:
        cfg, config_path = _config_from_args(args, check_kernel=True)
    except ConfigError as exc:
        return _print_problems("relay run", exc)
    from relay.process import supervisor  # lazy: workers, engines, metrics (~40 ms) for `run` only

    # An absolute path: reloads must find the same file whatever the working directory.
    path = os.path.abspath(config_path) if config_path else None
    rc = supervisor.run(cfg, path, _overrides(args))
    return rc if isinstance(rc, int) else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg, config_path = _config_from_args(args, check_kernel=True)
    except ConfigError as exc:
        return _print_problems("relay check", exc)
    from relay.config import interception

    for shadow in interception.shadows(cfg.listener):  # the ones that get nothing were refused
        print(f"{config_path or 'command line'}: warning: listener {shadow.name}: {shadow.reason}")
    names = ", ".join(f"{lst.name} ({lst.bind}, {lst.mode})" for lst in cfg.listener)
    print(
        f"{config_path or 'command line'}: OK: {len(cfg.listener)} listener(s): {names}; "
        f"{len(cfg.egress)} egress"
    )
    return EXIT_OK


def cmd_config_dump(args: argparse.Namespace) -> int:
    try:
        cfg, _ = _config_from_args(args, check_kernel=False, require_listener=False)
    except ConfigError as exc:
        return _print_problems("relay config dump", exc)
    sys.stdout.write(dumps(cfg, comments=not args.no_comments))
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from relay.host import doctor

    return doctor.main(args.config, as_json=args.json)


def cmd_version(args: argparse.Namespace) -> int:
    from relay.host import doctor

    info = doctor.versions()
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sys.stdout.write(doctor.format_versions(info))
    return EXIT_OK


def cmd_nft(args: argparse.Namespace) -> int:
    return int(nft.main(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from relay import demo  # lazy: the netns lab, only for `relay demo`

    return int(demo.main(list(args.demo_args)))


def cmd_admin(args: argparse.Namespace) -> int:
    """`relay stats|reload`: find the running relay's admin socket the way it was configured:
    --socket, else relay.admin_socket of -c FILE (or of the systemd default config when it
    exists; RELAY_ADMIN_SOCKET applies as for `relay run`), else RELAY_ADMIN_SOCKET."""
    prog = f"relay {args.command}"
    if not args.socket:
        config_path = args.config
        if config_path is None and os.path.exists(SYSTEM_CONFIG):
            config_path = SYSTEM_CONFIG
        if config_path is not None:
            try:
                args.socket = load(config_path).relay.admin_socket
            except ConfigError as exc:
                return _print_problems(prog, exc)
            if not args.socket:
                args.parser.error(f"{config_path} sets no relay.admin_socket; give --socket PATH")
        else:
            args.socket = os.environ.get("RELAY_ADMIN_SOCKET", "")
        if not args.socket:
            args.parser.error("no admin socket: give --socket PATH or -c FILE")
    if args.command in ("sessions", "kill"):
        from relay.ops import sessions

        return int(sessions.sessions_main(args) if args.command == "sessions"
                   else sessions.kill_main(args))
    from relay.ops import admin  # lazy: prometheus_client (~15 ms), only for the admin clients

    return int(admin.client_main(args))


def cmd_gen_systemd(args: argparse.Namespace) -> int:
    return int(systemd.render(args))


def cmd_completion(args: argparse.Namespace) -> int:
    from relay import cli_docs

    sys.stdout.write(cli_docs.completion(build_parser(), args.shell))
    return EXIT_OK


def cmd_gen_man(args: argparse.Namespace) -> int:
    from relay import cli_docs

    text = cli_docs.man_page(build_parser())
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `relay` command; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    try:
        argv_list = sys.argv[1:] if argv is None else list(argv)
        if argv_list[:1] == ["demo"]:
            # argparse.REMAINDER drops options ("--part 1"): hand them to the demo as they are.
            return cmd_demo(argparse.Namespace(demo_args=argv_list[1:]))
        args = parser.parse_args(argv_list)
        if args.version:
            return cmd_version(args)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(handler(args))
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2); sys.exit(...) anywhere
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        print(exc.code, file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (`relay config dump | head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
