"""The `tunelab` subcommands, one module each: `add_parser(subparsers)` declares the arguments and sets
`func`, the handler, which builds the same objects as the Python API. The CLI finds them through the
COMMANDS registry (a plug-in package can add its own)."""
