"""The one exception type for errors a user can cause.

The CLI turns a :class:`UserError` into one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, an option, a model spec, a budget."""
