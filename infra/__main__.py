"""Pulumi entry point: read the stack config, build the components, export their outputs."""

import config
import program

program.export(program.build(config.load()))
