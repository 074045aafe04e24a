"""Built-in qimem plugins (installed as ``qimem.builtin_plugins``).

Each module is an ordinary pluggy plugin, registered through the same hooks a third-party
package uses.
"""
