"""`python -m llm_devstack.standalone_gateway`: the gateway as `python -m llm_operator.gateway` runs it
(its flags, its traffic and admin servers, its bounds), the routing table given on the command line instead
of watched.

`--route NS/NAME=HOST:PORT` is a ready endpoint, `--route NS/NAME=` one at zero. A wake never completes,
unless `--wake-to HOST:PORT`: then the endpoint is ready there `--wake-after` seconds after the wake.
Every other flag is the gateway's own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace

from llm_operator.gateway.__main__ import parse_args, run_loop, serve, settings_from
from llm_operator.gateway.app import Gateway
from llm_operator.gateway.routing import Route, RoutingTable
from llm_operator.objects import Key


def table(routes: Sequence[str]) -> RoutingTable:
    """`NS/NAME=ADDRESS` (or `NS/NAME=`) pairs -> a routing table of public endpoints."""
    entries = {}
    for spec in routes:
        name, _, address = spec.partition("=")
        namespace, _, endpoint = name.partition("/")
        entries[(namespace, endpoint)] = Route(namespace, endpoint, addresses=(address,) if address else ())
    return RoutingTable(entries)


def main(argv: Sequence[str] | None = None) -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--route", action="append", default=[])
    own.add_argument("--wake-to")
    own.add_argument("--wake-after", type=float, default=0.0)
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(rest)
    gateway: Gateway

    async def wake(key: Key) -> None:
        if mine.wake_to is None:
            await asyncio.Event().wait()  # a scale-up that never finishes
        await asyncio.sleep(mine.wake_after)
        route = gateway.table.get(key)
        assert route is not None
        gateway.set_table(gateway.table.with_route(replace(route, addresses=(mine.wake_to,))))

    gateway = Gateway(settings_from(args), wake)
    gateway.set_table(table(mine.route))
    gateway.ready = True
    run_loop(serve(gateway, args.host, args.port, args.admin_port))


if __name__ == "__main__":
    main()
