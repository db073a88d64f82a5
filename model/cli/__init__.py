"""The command line: flag types and groups (:mod:`.args`), the run record and error boundary
(:mod:`.run`), and one module per command, each a short function from parsed flags to library
calls. Nothing outside this package imports it."""
