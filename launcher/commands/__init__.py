"""One module per `launcher` subcommand: HELP, configure(parser), run(args) -> int."""
