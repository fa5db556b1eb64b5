# Only the Markdown pages are collected here (their >>> examples run as doctests):
# the Sphinx config and the examples (run in their own processes by the tests)
# must not be imported.
collect_ignore = ["conf.py", "conftest.py", "examples", "_build", "_work"]
