"""A second SA1 v2 implementation, written only from docs/PROTOCOL.md.

It imports nothing of Tessera's (only the standard library and ``cryptography``), so
that when it reproduces tests/vectors/ the vectors and the document, not shared code,
are what agree with the reference implementation in structauth/.
"""
