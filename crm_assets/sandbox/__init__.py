"""The sandbox CRM: a real local HTTP server that implements ``crm_assets.contract``.

``python -m crm_assets.sandbox`` serves deterministic, realistic records for every resource in
``CRM_RESOURCES`` on a loopback port, with fault injection, scheduled mutations and a request
log behind a control API (``/_sandbox/...``). ``SandboxServer`` runs it in a subprocess and
``SandboxClient`` drives the control API, for tests and the demo; ``FlakyProxy`` adds the faults
an HTTP app cannot make (connections reset before any answer)::

    with SandboxServer(records=1000, seed=1) as sandbox:
        sandbox.client.add_fault(resource="deals", status=503, retry_after=1)
        ...  # point the sync at sandbox.url with DEFAULT_SANDBOX_API_KEY

Environment variables: none read here; the server process reads ``CRM_SANDBOX_API_KEY``.
"""

from crm_assets.sandbox.app import DEFAULT_SANDBOX_API_KEY
from crm_assets.sandbox.client import SandboxClient, SandboxError
from crm_assets.sandbox.proxy import FlakyProxy
from crm_assets.sandbox.server import SandboxServer, SandboxStartError

__all__ = [
    "DEFAULT_SANDBOX_API_KEY",
    "FlakyProxy",
    "SandboxClient",
    "SandboxError",
    "SandboxServer",
    "SandboxStartError",
]
