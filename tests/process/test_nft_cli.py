"""`relay nft` as an unprivileged process: it prints the plan and says it could not validate it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or shutil.which("nft") is None,
                    reason="needs root, setpriv and nft to run `relay nft` as an unprivileged user")
def test_printing_without_cap_net_admin_says_it_could_not_validate() -> None:
    code = f"import sys; sys.path.insert(0, {REPO_ROOT!r}); from relay.ops.nft import main; " \
           "raise SystemExit(main(sys.argv[1:]))"
    demo_config = os.path.join(REPO_ROOT, "relay", "data", "demo.toml")
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code, "-c", demo_config],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert res.returncode == 0, res.stderr
    assert "tproxy ip to 127.0.0.1:7000" in res.stdout
    assert "# not validated: nft -c needs CAP_NET_ADMIN" in res.stdout
