"""The CoAP gateway: the second enforcement point beside the Mosquitto plugin.

An aiocoap site wrapper (:class:`~broker_plugin.coap.site.TesseraSite`) that runs the
SA1 handshake at ``/.well-known/sa1``, checks the proof on every request and proves
every response; the wire rules it shares with the device are in
:mod:`structauth.coap_binding`. docs/COAP.md describes it.
"""
