"""The ``freezetune`` command line: parse -> config -> library call. No logic lives only here."""
