"""The `fsad` command line (`flows.cli.main`), its local commands and the demo: the top of the layers."""
