"""One module per command (convert, inspect, verify, unfuse, example), each orchestrating the
layers below; cli.py is the shell over them."""
