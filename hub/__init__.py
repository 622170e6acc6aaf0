"""callhomehub: a self-hosted SSH hub that devices behind NAT call home to."""

__version__ = "0.1.0"
