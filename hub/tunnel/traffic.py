"""Bytes carried through device tunnels, as plain counters a metrics reader sums.

Every channel dialled into a device (`NodeTunnel.dial`: a per-device port's
splice, a jump-host relay, the hub's own SSH client to the device) is given the
hub's `Traffic` and adds to it where it already counts its own bytes: once per
TCP read or write batch for the splice, once per packet for relays. An int
addition; nothing else on the data path.
"""

from __future__ import annotations

from attrs import define


@define
class Traffic:
    """Bytes sent into devices and received from them since the hub started."""

    to_device: int = 0
    from_device: int = 0
