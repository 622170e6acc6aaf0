"""Where a profiled process spent its time: a summary of py-spy's collapsed stacks.

    .venv/bin/python bench/stacks.py hub-profile.txt [--top N]

Reads `py-spy record --format raw` output (one `frame;frame;... count` line per
distinct stack, outermost frame first) and prints the functions with the most
samples on top of the stack (self) and anywhere in it (inclusive), as a share
of all samples. Idle samples are not in py-spy's output unless `--idle` was
given, so the shares are of the time the process was running; samples of
threads other than the reactor's are left out unless `--threads`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from attrs import define

# Twisted's thread pool (DNS, deferToThread) waits in Condition.wait, which
# py-spy does not always see as idle; the reactor runs in the main thread.
WORKER_THREAD = "Thread._bootstrap"


@define(frozen=True)
class Profile:
    total: int
    own: Counter[str]
    inclusive: Counter[str]


def read(path: Path, threads: bool = False) -> Profile:
    """Collapsed stacks from `path`; only the main thread's unless `threads`."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not threads and any(WORKER_THREAD in frame for frame in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return Profile(total, own, inclusive)


# What a native (`--native`) frame on top of the stack is doing, by its name.
KINDS = (
    ("socket send/recv", ("send ", "recv ", "sendto ", "recvfrom ", "sendmsg ", "recvmsg ")),
    ("epoll", ("epoll_wait ", "epoll_ctl ")),
    ("getrandom", ("getrandom ", "os_urandom ")),
    ("libc memcpy/malloc (anonymous libc frames)", ("0x", "malloc ", "free ", "memcpy",
                                                      "memmove", "__memmove", "realloc ")),
)
# Frames in these libraries are the cryptography package: OpenSSL and its bindings.
CRYPTO_LIBRARIES = ("_rust.abi3.so", "libcrypto")


def kind(frame: str) -> str:
    if any(lib in frame for lib in CRYPTO_LIBRARIES):
        return "cryptography (OpenSSL and bindings)"
    if ".py:" not in frame:
        for name, prefixes in KINDS:
            if frame.startswith(prefixes):
                return name
    return "Python, interpreter and the rest"


def by_kind(profile: Profile) -> str:
    kinds: Counter[str] = Counter()
    for frame, n in profile.own.items():
        kinds[kind(frame)] += n
    return "\n".join(f"  {100 * n / max(1, profile.total):5.1f}%  {name}"
                     for name, n in kinds.most_common())


def render(profile: Profile, top: int) -> str:
    lines = [f"{profile.total} samples"]
    for title, counter in (("self", profile.own), ("inclusive", profile.inclusive)):
        lines.append(f"\n{title}:")
        for frame, n in counter.most_common(top):
            lines.append(f"  {100 * n / max(1, profile.total):5.1f}%  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("raw", type=Path, help="py-spy record --format raw output")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", action="store_true", help="count other threads' samples too")
    p.add_argument("--kinds", action="store_true",
                   help="also group self time by kind (for --native profiles)")
    args = p.parse_args(argv)
    profile = read(args.raw, args.threads)
    print(render(profile, args.top))
    if args.kinds:
        print(f"\nby kind:\n{by_kind(profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
