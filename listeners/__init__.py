"""Event-listener plugins (``ray_workflows.listeners.*``), registered through the
``ray_workflows.listeners`` entry-point group."""
