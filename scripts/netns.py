#!/usr/bin/env python3
"""Two emulated nodes on one machine: network namespaces joined by a rate-limited veth pair.

    sudo python3 scripts/netns.py up --rate 1gbit      # NAME0 (10.213.0.1) <-> NAME1 (10.213.0.2)
    sudo python3 scripts/netns.py run 0 -- CMD ...     # CMD inside node 0's namespace
    sudo python3 scripts/netns.py down                 # delete both namespaces (and the veth pair)

`up` makes namespaces NAME0 and NAME1 (--name, default "plait-node"), a veth pair with one end
in each (NAME0-v / NAME1-v, addresses NET.1/24 and NET.2/24 from --net, default 10.213.0) and a
token-bucket filter (tc tbf) on both ends' egress at --rate, so each direction is capped as a
full-duplex link of that rate would be. Traffic between ranks of one node stays inside its
namespace (the kernel routes a namespace's own addresses through its loopback), so only
inter-node traffic crosses the shaped link: start each node's ranks with
GLOO_SOCKET_IFNAME=NAMEi-v. `up` replaces namespaces of the same name left from an earlier run.
`check` makes and removes a throwaway pair to tell whether this machine can (exit 0) or cannot.

Root only, standard library only. Where it cannot run it prints one line saying why on stderr
and exits with a code of its own: 3 not root, 4 no `ip` (iproute2), 5 no `tc` or no tbf qdisc
(the sch_tbf module), 6 the namespaces or the veth pair could not be made (a container without
CAP_NET_ADMIN, for one); 2 is a usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

EXIT_USAGE, EXIT_NOT_ROOT, EXIT_NO_IP, EXIT_NO_TBF, EXIT_NO_NETNS = 2, 3, 4, 5, 6
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(bit|bps)$", re.IGNORECASE)
_UNIT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
TIMER_HZ = 250  # tbf needs a burst of at least rate / HZ bytes to reach its rate on coarse timers


class CannotRun(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def rate_bits_per_s(rate: str) -> float:
    """tc's rate syntax as bits/s: '1gbit' -> 1e9, '2.5gbit' -> 2.5e9, '100mbps' -> 8e8."""
    match = _RATE.match(rate.strip())
    if not match:
        raise CannotRun(f"--rate {rate!r}: write it as tc does, e.g. 1gbit, 2.5gbit or 500mbit", EXIT_USAGE)
    value = float(match.group(1)) * _UNIT[match.group(2).lower()]
    return value * (8 if match.group(3).lower() == "bps" else 1)


def burst_bytes(bits_per_s: float) -> int:
    return max(256 * 1024, int(bits_per_s / 8 / TIMER_HZ))


def node_names(name: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """((namespace, veth) of node 0, (namespace, veth) of node 1)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,11}", name):  # a veth name NAMEi-v must fit IFNAMSIZ (15)
        raise CannotRun(f"--name {name!r}: use 1-11 letters, digits, '-' or '_'", EXIT_USAGE)
    return (f"{name}0", f"{name}0-v"), (f"{name}1", f"{name}1-v")


def _sh(*command: str, code: int = EXIT_NO_NETNS, what: str = "") -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit code {done.returncode}"
        raise CannotRun(f"cannot {what or ' '.join(command)}: {reason}", code)


def check_can_run() -> None:
    if os.geteuid() != 0:
        raise CannotRun("needs root (network namespaces, veth and tc); run it with sudo", EXIT_NOT_ROOT)
    if shutil.which("ip") is None:
        raise CannotRun("no `ip` command; install iproute2", EXIT_NO_IP)
    if shutil.which("tc") is None:
        raise CannotRun("no `tc` command (needed for the tbf rate limit); install iproute2", EXIT_NO_TBF)


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def down(name: str) -> None:
    """Delete both namespaces; deleting one deletes its veth end, and with it the pair."""
    present = _namespaces()
    for namespace, _ in node_names(name):
        if namespace in present:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def up(name: str, *, rate: str, net: str) -> list[str]:
    """Make the two namespaces and the shaped link; lines describing them."""
    bits_per_s = rate_bits_per_s(rate)
    if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", net):
        raise CannotRun(f"--net {net!r}: give the first three octets of a /24, e.g. 10.213.0", EXIT_USAGE)
    check_can_run()
    down(name)
    nodes = node_names(name)
    try:
        for namespace, _ in nodes:
            _sh("ip", "netns", "add", namespace, what=f"make network namespace {namespace}")
        (ns0, veth0), (ns1, veth1) = nodes
        _sh("ip", "link", "add", veth0, "netns", ns0, "type", "veth", "peer", "name", veth1, "netns", ns1,
            what=f"make the veth pair {veth0} <-> {veth1}")  # fmt: skip
        for index, (namespace, veth) in enumerate(nodes):
            _sh("ip", "-n", namespace, "addr", "add", f"{net}.{index + 1}/24", "dev", veth)
            _sh("ip", "-n", namespace, "link", "set", veth, "up")
            _sh("ip", "-n", namespace, "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", veth, "root", "tbf",
                "rate", rate, "burst", str(burst_bytes(bits_per_s)), "latency", "50ms",
                code=EXIT_NO_TBF, what=f"shape {veth} with tc tbf (is the sch_tbf module available?)")  # fmt: skip
        _wait_for_carrier(nodes)
    except CannotRun:
        down(name)
        raise
    return [
        f"node {index}: namespace {namespace}, interface {veth}, address {net}.{index + 1}"
        for index, (namespace, veth) in enumerate(nodes)
    ] + [f"link: tbf {rate} ({bits_per_s / 1e9:g} Gbit/s) each way, burst {burst_bytes(bits_per_s)} bytes"]


def _wait_for_carrier(nodes: tuple[tuple[str, str], ...], *, timeout_s: float = 5.0) -> None:
    """A veth end reports NO-CARRIER for a moment after both ends are up: return once neither does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown = [subprocess.run(["ip", "-n", ns, "link", "show", veth], capture_output=True, text=True).stdout
                 for ns, veth in nodes]  # fmt: skip
        if not any("NO-CARRIER" in text for text in shown):
            return
        time.sleep(0.05)
    raise CannotRun(
        f"the veth pair {nodes[0][1]} <-> {nodes[1][1]} has no carrier after {timeout_s:.0f} s", EXIT_NO_NETNS
    )


def run_in(name: str, node: int, command: list[str]) -> int:
    namespace, veth = node_names(name)[node]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": veth}
    return subprocess.call(["ip", "netns", "exec", namespace, *command], env=env)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options, and for `run` the command after `--` (kept whole: its own flags are not ours)."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "check", "run"])
    parser.add_argument("node", nargs="?", type=int, choices=[0, 1], help="run: the node (0 or 1)")
    parser.add_argument("--name", default="plait-node", help="namespace prefix: NAME0, NAME1 (default plait-node)")
    parser.add_argument("--rate", default="1gbit", help="the link's rate each way, in tc's syntax (default 1gbit)")
    parser.add_argument("--net", default="10.213.0", help="the /24 the two ends share (default 10.213.0)")
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        if args.action == "up":
            print("\n".join(up(args.name, rate=args.rate, net=args.net)))
        elif args.action == "check":
            up(f"{args.name[:9]}-c", rate=args.rate, net=args.net)
            down(f"{args.name[:9]}-c")
            print(f"netns.py: can make two namespaces with a {args.rate} tbf link")
        elif args.action == "down":
            check_can_run()
            down(args.name)
        else:
            if args.node is None or not args.command:
                raise CannotRun("run: give the node and a command, e.g. `run 0 -- hostname -I`", EXIT_USAGE)
            return run_in(args.name, args.node, args.command)
    except CannotRun as error:
        print(f"netns.py: {error}", file=sys.stderr)
        return error.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
