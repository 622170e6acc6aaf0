"""What the hub adds to Twisted Conch's SSH: packet protection, kex, transport and connection
mixins, channel windows and writes, keys."""
