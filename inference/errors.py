"""The one base class of errors the user reads: each message is one plain sentence.

Every layer raises a subclass for what went wrong in its own terms; the CLI prints the sentence
after ``idc-viewer CMD: error:`` and the GUI shows it in a dialog or the status bar. Details
(the chained exception) go to the log, never to the user.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can act on (a bad file, a missing resolution...), in one sentence."""
