"""Admin tools that run by hand, not as services: ``hakuriver.docker`` (container
environments, :mod:`~hakuriver.admin.environments`) and ``hakuriver.init`` (config files and
systemd units, :mod:`~hakuriver.admin.init`). They import the core, never the runner or host."""
