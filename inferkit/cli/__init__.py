"""The command-line interface: thin Typer commands that parse, call the library and print."""
