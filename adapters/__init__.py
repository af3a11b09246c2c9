"""Everything that touches the world: asyncssh adapter, backends, CLI, logging."""

import warnings

from cryptography.utils import CryptographyDeprecationWarning

# cryptography 51 deprecates DSA and warns when a module touches its DSA names
# (pyca/cryptography#15597); asyncssh 2.24.1 does at import, so every `sshspec`
# command printed five warnings on stderr before its own output. sshspec neither
# offers nor accepts DSA (algorithms.py), so those warnings say nothing to its
# users: only asyncssh's DSA ones are silenced, before any adapter imports asyncssh.
warnings.filterwarnings("ignore", message="DSA is deprecated", category=CryptographyDeprecationWarning,
                        module=r"asyncssh\.")
