"""Views of a run, on top of everything: status tables and the cost report."""
