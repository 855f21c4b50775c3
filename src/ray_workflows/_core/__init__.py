"""The engine's implementation: private, no stable API. Import the public
modules (``ray_workflows``, ``ray_workflows.aio``, ``ray_workflows.storage``,
``ray_workflows.clock``, ``ray_workflows.testing``) instead."""
