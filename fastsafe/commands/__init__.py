"""Sub-commands of the ``fastsafe`` command line (see ``fastsafe.cli``)."""
