"""Command line: ``python -m ondemand_seg.ray export ...``, the export command with its samples
generated and written by Ray actors, on this machine or on every node of a running cluster.

Flags are ``python -m ondemand_seg export``'s (but ``--workers`` and ``--device``), and ``--actors``,
``--num-gpus``, ``--num-cpus`` and ``--address``. Without ``--address``, Ray joins the cluster
``RAY_ADDRESS`` names or the one ``ray start`` started on this machine, else starts a local one.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..cli import HelpFormatter, add_generator_arguments, resolve_generator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ondemand_seg.ray", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", formatter_class=HelpFormatter,
                                 help="write generated samples to a folder every node sees, from Ray actors "
                                      "(resumable: rerun the same command to finish)")
    add_generator_arguments(export)
    export.add_argument("--out", required=True, help="folder on storage every node mounts at the same path")
    export.add_argument("--n", type=int, required=True, help="samples to write")
    export.add_argument("--start", type=int, default=0, help="index of the first sample")
    export.add_argument("--format", default="voc", help="voc, webdataset or hf")
    export.add_argument("--shard-size", type=int, default=1000, help="samples per shard, the unit an actor writes")
    export.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="png: lossless images")
    export.add_argument("--overwrite", action="store_true", help="remove an earlier export in --out and start afresh")
    export.add_argument("--seed", type=int, default=0)
    ray = export.add_argument_group("ray")
    ray.add_argument("--actors", type=int, default=1, help="generating actors, each loading the model once")
    ray.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (0: generate on CPUs)")
    ray.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (on a CPU, its torch threads)")
    ray.add_argument("--address", default=None, help="cluster to join: 'auto', HOST:6379 or ray://HOST:10001")
    return parser


# Seconds to wait for a cluster's head to accept a connection: ray.init itself waits minutes on an
# address where nothing listens.
CONNECT_TIMEOUT_S = 5.0


def check_address(address: str | None) -> None:
    """``address`` when it is ``None``, ``"auto"``, ``"local"`` or a ``[ray://]HOST:PORT`` that accepts
    a connection; a ValueError naming it otherwise."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address!r} must be 'auto', 'local', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ValueError(f"--address {address!r}: nothing accepts a connection there ({error}); is the cluster's "
                         "head running at that address?") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a bad flag value is a usage error (exit 2) naming it, before Ray starts."""
    from ..exports.plan import ExportError
    from ..exports.run import check_export_args
    from . import ActorPool, ClusterTooSmall, export, require_ray

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ray = require_ray()
        ActorPool.check(args.actors, args.num_gpus, args.num_cpus)
        check_export_args(args.out, args.n, start=args.start, format=args.format, shard_size=args.shard_size,
                          image_format=args.image_format)
        config, classes = resolve_generator(args)
        check_address(args.address)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.address is not None:
        ray.init(address=args.address)
    try:
        metadata = export(args.model, classes, args.out, args.n, start=args.start, seed=args.seed, format=args.format,
                          shard_size=args.shard_size, image_format=args.image_format, overwrite=args.overwrite,
                          actors=args.actors, num_gpus=args.num_gpus, num_cpus=args.num_cpus, **config.to_dict())
    except (ExportError, ClusterTooSmall) as error:
        parser.error(str(error))
    print(f"wrote {args.n} samples ({args.format}, {metadata['shards']} shards) to {args.out} with {args.actors} "
          f"Ray actor(s); quality gate: {metadata['gate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
