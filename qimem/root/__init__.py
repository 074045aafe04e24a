"""The root of trust: root-key providers, the root keyring, rotation and escrow.

Every wrapped row (key material, token signing keys, OTP secrets, login-provider settings)
is sealed under a *root version*: a 32-byte key-wrapping key (KWK) held in memory by
:class:`qimem.rootkey.KeyWrapper`. A root-key provider (``[root_key] provider``; a plugin,
:mod:`qimem.root.provider`) wraps and unwraps each version's KWK under a root secret it
holds, which may never leave a device (PKCS#11) or another server (``qimem``). The wrapped
KWKs, one per version, live in the store's root keyring (:mod:`qimem.root.keyring`);
``qimem root rotate`` adds a version and moves every row to it (:mod:`qimem.root.rotation`).

A store that was never rotated and whose provider is ``file`` or ``env`` has no keyring: its
one version (1) is the root key itself, exactly as before root versions existed.
"""
