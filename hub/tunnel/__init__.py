"""Live node tunnels: forwards and their ports, the pipes that carry bytes, the port keeper."""
