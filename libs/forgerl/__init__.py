"""ForgeRL: agentic RL for MiniMax-M2-architecture mixture-of-experts models.

The import root of the monorepo. Shared libraries live here (libs/forgerl); the services
(`forgerl.services`, folder services/) and the Triton kernels (`forgerl.kernels`, folder kernels/)
are linked in so that one editable install serves every part.
"""

__version__ = "0.1.0"
