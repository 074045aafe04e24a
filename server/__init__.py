"""The qimem HTTP server (installed as ``qimem.server``).

:func:`qimem.server.app.create_app` builds the Falcon app; :mod:`qimem.server.runner`
serves it with waitress and shuts down gracefully on SIGTERM/SIGINT.
"""
