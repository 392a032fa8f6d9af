"""Pure streaming logic: no sockets, no torch."""
