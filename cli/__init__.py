"""Command-line entry points (click). Thin: parse -> one library call -> summary; torch loads inside commands."""
