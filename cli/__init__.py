"""The thin typer app over the library."""
