"""The application layer over the library: the demo, the study, reports and plots.

Nothing in ``featcache.pipeline`` (the library) imports this package; the CLI does.
"""
