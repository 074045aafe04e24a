"""The qimem HTTP server (installed as ``qimem.server``)."""
