"""One module per ``xcit`` command, each exposing ``main(argv) -> int``."""
