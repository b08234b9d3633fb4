"""Tools around the project that are no part of the data flow: loopback servers for trying
remote datasets on one machine and for the tests (``python -m tools.serve``), and the docs
site's generated reference pages (``python -m tools.gendocs``)."""
