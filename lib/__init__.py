"""The support library of the scripts; no module here imports a script, and only ``lib.cli`` is the command line."""
