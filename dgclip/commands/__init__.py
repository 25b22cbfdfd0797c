"""One module per `dgclip` verb: `add_parser(subparsers)` builds its flags (no torch import) and
`run(args) -> int` does the work (heavy imports inside). dgclip/cli.py lists them."""
