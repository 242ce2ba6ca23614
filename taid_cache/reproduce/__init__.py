"""`make reproduce`: both stages end to end on the embedded default (built from the Python standard library) or
a YAML config naming real models and data, then evaluation against the real teacher and a report."""
