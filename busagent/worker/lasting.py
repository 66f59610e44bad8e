"""The one policy for a Redis failure that lasts, shared by the inbox reader, the heartbeat and
the reply writer: log it once per distinct cause (and once when it clears), and back off 0.5 s
doubling to 5 s. A refusal (out of memory, an ACL change) can last hours; a line per retry
would bury the one line that says what is wrong, and a 0.05 s retry loop only adds load to a
Redis that is already in trouble."""

from __future__ import annotations

import logging

#: the first wait after a failure and the longest (seconds).
FIRST, MOST = 0.5, 5.0


class Lasting:
    """The state of one retried operation: the cause last logged and the next wait."""

    def __init__(self, log: logging.Logger, cleared: str) -> None:
        self.log = log
        #: logged once when the operation works again after a failure was logged.
        self.cleared_message = cleared
        self.said = ""
        self.delay = FIRST

    def failed(self, message: str) -> float:
        """Log ``message`` (a WARNING) unless it is the one logged last; return how long to
        wait before trying again (seconds: 0.5 doubling to 5)."""
        if message != self.said:
            self.log.warning("%s", message)
            self.said = message
        d = self.delay
        self.delay = min(self.delay * 2, MOST)
        return d

    def worked(self) -> None:
        """The operation worked: say so if a failure was logged, and reset the back-off."""
        if self.said:
            self.log.warning("%s", self.cleared_message)
        self.said, self.delay = "", FIRST
