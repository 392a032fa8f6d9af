"""The load generator behind `rt-server bench`: simulated streaming clients, their statistics, the servers.

Pure parts (no sockets, no clocks of their own): `stats`, `playback`, `trigger`, `script`, `prometheus`.
I/O parts: `client` (one simulated listener over a real WebSocket), `server_proc` (a spawned server and its
/proc figures), `run` (one load level, the interleaved sweep), `report` (table, JSON, plot).
"""
