"""nginx, config generated into a temp dir, run in the foreground as our own process tree.

Three roles: the HTTP origin of the connection-rate metric (a small static response), and the
stream module as a TCP proxy and as a UDP proxy (the `nginx-stream` contender). One worker
process, to compare with the other single-threaded contenders; the master stays in the
foreground (`daemon off`) in the process group the harness created, so stopping it by pid ends
the worker too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# Shared by every role: one worker, no daemon, everything nginx writes goes to the temp dir.
MAIN = """\
{load_module}worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {tmp}/nginx-{port}.pid;
error_log stderr warn;

events {{
    worker_connections {conns};
    multi_accept on;
}}
"""

HTTP = """\
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "hello from the nginx origin\\n";
        }}
    }}
}}
"""

# TCP: the stream module's best settings for a plain TCP proxy on loopback (no proxy_protocol,
# TCP_NODELAY is nginx's default for stream, large enough buffer for bulk).
STREAM_TCP = """\
stream {{
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass {backend_host}:{backend_port};
        proxy_buffer_size 256k;
        proxy_connect_timeout 5s;
        proxy_timeout 10m;
    }}
}}
"""

# UDP: one-way traffic (the UDP load driver's sink never answers): proxy_responses 0 ends a
# session once the datagram is forwarded, as the nginx docs describe for such traffic.
STREAM_UDP = """\
stream {{
    server {{
        listen 127.0.0.1:{port} udp;
        proxy_pass {backend_host}:{backend_port};
        proxy_responses 0;
        proxy_timeout 10s;
    }}
}}
"""


def available() -> str | None:
    """None when the nginx binary can run, else why the nginx roles are skipped."""
    exe = shutil.which("nginx")
    if exe is None:
        return "not installed: nginx (Debian nginx-light)"
    try:
        subprocess.run([exe, "-v"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nginx -v failed: {exc}"
    return None


def stream_available() -> str | None:
    reason = available()
    if reason:
        return reason
    if not STREAM_MODULE.exists():
        return f"not installed: {STREAM_MODULE} (Debian libnginx-mod-stream)"
    return None


def version() -> str:
    try:
        done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    return (done.stderr.strip() or done.stdout.strip() or "unknown").splitlines()[0]


def _main(tmp: Path, port: int, nofile: int, stream: bool) -> str:
    load = f"load_module {STREAM_MODULE};\n" if stream else ""
    conns = max(1024, nofile // 2 - 100)
    return MAIN.format(load_module=load, nofile=nofile, tmp=tmp, port=port, conns=conns)


def origin_config(tmp: Path, port: int, nofile: int) -> Path:
    """The HTTP origin of the connection-rate metric."""
    path = tmp / f"nginx-origin-{port}.conf"
    path.write_text(_main(tmp, port, nofile, stream=False) + HTTP.format(tmp=tmp, port=port))
    return path


def stream_config(tmp: Path, port: int, backend: tuple[str, int], nofile: int, udp: bool = False) -> Path:
    """The stream module as a TCP (or UDP) proxy from 127.0.0.1:port to backend."""
    template = STREAM_UDP if udp else STREAM_TCP
    path = tmp / f"nginx-stream-{'udp' if udp else 'tcp'}-{port}.conf"
    path.write_text(_main(tmp, port, nofile, stream=True)
                    + template.format(port=port, backend_host=backend[0], backend_port=backend[1]))
    return path


def argv(config: Path) -> list[str]:
    # -e stderr: nginx opens its compiled-in error log before reading the config otherwise.
    return ["nginx", "-e", "stderr", "-p", str(config.parent), "-c", str(config)]
