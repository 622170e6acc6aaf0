"""The web console: pages, sign-in, the web terminal, the device web UI proxy, metrics."""
