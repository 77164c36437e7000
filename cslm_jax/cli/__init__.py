"""`cslm-jax`: the command line. `main` builds the parser from one module per command (each an
`add_parser(sub)` and a `run(args)` that calls the package's functions with explicit arguments);
`setup` prepares the process. Nothing outside this package imports it."""
