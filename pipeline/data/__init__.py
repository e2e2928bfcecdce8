"""Data sets: rows and groups (``rows``), decoding (``decode``), the catalog of names, the
built-in sets, users' files, and corpora read in place (``wds``, ``hfds``). Also the class and
template files of the built-in sets (package data)."""
