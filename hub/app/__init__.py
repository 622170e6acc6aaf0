"""Wiring: the twistd service, configuration, the admin CLI and its control socket, logging."""
