"""Pulumi entry point: read the stack config, build every resource, export the outputs."""

import config
import program

program.export(program.build(config.load()))
