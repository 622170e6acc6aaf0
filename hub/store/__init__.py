"""The registry: nodes, leases, operators, settings, results and the audit log."""
