"""Several hubs serving one fleet: identity, heartbeat, peering and cross-hub routing."""
