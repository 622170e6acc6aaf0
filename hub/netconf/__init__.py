"""NETCONF call home (RFC 8071): the Junos preamble and the hub as the device's SSH client."""
