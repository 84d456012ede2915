"""The `app` command: start the synthgen Streamlit app on a local address."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from importlib.util import find_spec
from pathlib import Path

logger = logging.getLogger("synthgen")

# NOTE: the app lives beside the package, which works in a source checkout (the editable install
# the scripts make). A wheel does not ship it, so there SYNTHGEN_APP must name app/synthgen_app.py.
APP_ENTRY = Path(__file__).resolve().parent.parent / "app" / "synthgen_app.py"
_EPILOG = ("The app has no authentication: keep it on a loopback address, or put it behind a proxy that "
           "authenticates. It reads the catalog named by --catalog or SYNTHGEN_CATALOG and the Hub named by "
           "HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. Exit status: 2 on invalid input, otherwise Streamlit's.")


def app_entry() -> Path:
    entry = Path(os.environ.get("SYNTHGEN_APP") or APP_ENTRY)
    if not entry.is_file():
        raise FileNotFoundError(f"app entry {entry} not found; run from a source checkout of synthgen, or set "
                                "SYNTHGEN_APP to the path of app/synthgen_app.py")
    return entry


def streamlit_command(host: str, port: int, entry: Path) -> list[str]:
    """Return the `streamlit run` command line that serves the app on host:port."""
    return [sys.executable, "-m", "streamlit", "run", str(entry),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            # Pages show synthgen's errors as messages; an uncaught one shows its type only, never a traceback.
            "--client.showErrorDetails", "type",
            "--server.fileWatcherType", "none"]


def _check_host(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"--host must be an IP address or localhost, got {host!r}") from None
        return
    if not address.is_loopback:
        logger.warning("serving the app on %s: anyone who can reach this address can browse the catalog, pull "
                       "releases and query datasets; the app has no authentication", host)


def _cmd_app(args) -> int:
    _check_host(args.host)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if find_spec("streamlit") is None:
        raise ValueError("streamlit is not installed; install the app extra: pip install 'synthgen[app]'")
    entry = app_entry()
    if args.catalog:
        os.environ["SYNTHGEN_CATALOG"] = str(Path(args.catalog).expanduser().resolve())
    command = streamlit_command(args.host, args.port, entry)
    logger.info("serving the synthgen app on http://%s:%d (catalog %s)", args.host, args.port,
                os.environ.get("SYNTHGEN_CATALOG", "default"))
    sys.stdout.flush()
    sys.stderr.flush()
    # exec keeps the process id, so the caller of `synthgen app` can stop the server by that id.
    os.execv(command[0], command)
    return 0  # not reached


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `app` to the synthgen command line."""
    app = commands.add_parser("app", help="start the app to browse generators, samples, privacy cards and datasets",
                              epilog=_EPILOG)
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    app.add_argument("--port", type=int, default=8501, help="TCP port to serve on (default 8501)")
    app.add_argument("--catalog", help="catalog file (default $SYNTHGEN_CATALOG or "
                                       "~/.local/share/synthgen/catalog.duckdb)")
    app.set_defaults(handler=_cmd_app)
