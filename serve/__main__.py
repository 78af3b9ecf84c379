"""Serve a head or fine-tune run as a diagnosis web page and JSON API.

    python -m serve --run runs/nih-densenet121-mlp3 --port 8000      # or: cxr serve ...

The model is loaded once at start; concurrent requests are batched for it (--max-batch, --wait-ms).
It listens on 127.0.0.1 unless --host says otherwise. Research tool, not a medical device.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from dataclasses import dataclass

from common.config import ConfigError, HelpFormatter, log, parse_with_config, require, settings_of
from common.images.decode import MAX_PIXELS
from common.runs.command import run_command

# torch, Flask and the model come with the serving below, once the flags are good.

PROG = "python -m serve"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file whose [serve] table sets defaults for these flags")
    p.add_argument("--run", help="run directory of heads.train (frozen backbone(s) + head) or of a fine-tune (best.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused with 413")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="images with more pixels are refused from their header, before decoding (422)")
    p.add_argument("--max-batch", type=int, default=16, help="requests answered by one forward pass at most")
    p.add_argument("--wait-ms", type=float, default=10.0,
                   help="how long the model waits for more requests to fill a batch")
    p.add_argument("--http-threads", type=int, default=8, help="requests handled (and decoded) at once")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: all cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one, else cpu), cpu, or cuda[:N]")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model precision (fp16 on CUDA only)")
    p.add_argument("--keep-uploads", metavar="DIR",
                   help="also write each upload there, named by its sha256 (default: nothing is written)")
    return p


@dataclass(frozen=True)
class ServeSettings:
    """One field per flag (--config aside); the defaults live in the parser."""

    run: str
    host: str
    port: int
    max_upload_mb: float
    max_pixels: int
    max_batch: int
    wait_ms: float
    http_threads: int
    threads: int | None
    device: str
    precision: str
    keep_uploads: str | None


def settings_from(args: argparse.Namespace) -> ServeSettings:
    check_flags(args)
    return settings_of(ServeSettings, args)


def check_flags(args: argparse.Namespace) -> None:
    require(args, "run")
    for flag in ("max_upload_mb", "max_pixels", "max_batch", "http_threads"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.wait_ms < 0:
        raise ConfigError(f"--wait-ms {args.wait_ms}: must be 0 or more")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port}: out of range (0 to 65535)")
    if args.keep_uploads and not os.path.isdir(args.keep_uploads):
        raise ConfigError(f"--keep-uploads {args.keep_uploads}: not a directory (create it first)")


def build(args: argparse.Namespace):
    """The loaded model, its batcher and the Flask app, from good flags."""
    import torch

    from serve.app import Settings, create_app
    from serve.batcher import Batcher
    from serve.model import load_served

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    served = load_served(args.run, device, args.precision, args.threads, log=log)
    batcher = Batcher(served.predict, args.max_batch, args.wait_ms)
    settings = Settings(args.max_upload_mb, args.max_pixels, args.keep_uploads)
    return served, batcher, create_app(served, batcher, settings)


def listen(args: argparse.Namespace) -> socket.socket:
    """The socket to serve on, bound and listening now: a busy port (or an --host not of this machine)
    is refused in one line before the model loads, not with a traceback after it."""
    try:
        family, _, _, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {args.host}: {exc.strerror}") from None
    try:
        return socket.create_server(address, family=family)
    except OSError as exc:
        flag = f"--host {args.host}" if exc.errno == errno.EADDRNOTAVAIL else f"--port {args.port}"
        why = os.strerror(exc.errno) if exc.errno else exc  # create_server's own text repeats the address
        raise ConfigError(f"{flag}: cannot listen on {args.host}:{args.port} ({why})") from None


def make_server(app, args: argparse.Namespace, sock: socket.socket | None = None):
    """The waitress server of `app` on `sock` (default: listen(args)), sized by the flags.

    Bodies up to twice --max-upload-mb are read, in memory (waitress would spool larger ones to a
    temporary file, and no upload is written anywhere unasked), so the app answers an oversized one
    with its JSON 413 while the client can still read it; beyond that waitress cuts the connection
    with a plain 413 instead of reading gigabytes.
    """
    from waitress import create_server

    limit = int(args.max_upload_mb * 1024 * 1024)
    return create_server(app, sockets=[sock or listen(args)], threads=args.http_threads,
                         max_request_body_size=2 * limit + (1 << 20), inbuf_overflow=2 * limit + (1 << 20))


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """Serve --run until interrupted; bad input raises (cli turns it into the one-line exit)."""
    args = settings_from(parse_with_config(build_parser(prog), argv, "serve"))
    sock = listen(args)
    served, batcher, app = build(args)

    server = make_server(app, args, sock)
    log(f"serving {served.kind} run {served.identity['run']} ({served.identity['backbone']}, "
        f"{len(served.label_names)} findings) on http://{server.effective_host}:{server.effective_port}/ "
        f"(research tool, not a medical device)")
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        batcher.close()


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    # RuntimeError and OSError: torch's refusal of a model file, a run folder that cannot be read.
    return run_command(main, argv, prog, also=(RuntimeError, OSError))


if __name__ == "__main__":
    cli()
