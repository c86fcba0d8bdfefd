"""SA1 structural-auth sessions: the sans-IO protocol core of Tessera.

No sockets, no clocks, no asyncio: bytes and a time value in, bytes and events out.
"""
