"""Sub-commands of the ``kvmkit`` CLI, one module each (see :mod:`kvmkit.cli`)."""
