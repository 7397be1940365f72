"""The exception hierarchy. Each boundary converts these once (DESIGN.md §8.3)."""


class RtpproxyError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(RtpproxyError):
    """A flag or config value is wrong; the message names it and the fix."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class EngineError(RtpproxyError):
    """The media engine refused a call; carries the errno it returned."""

    def __init__(self, what: str, errno_: int):
        import os

        super().__init__(f"{what}: {os.strerror(errno_)}")
        self.errno = errno_


class PortsExhausted(RtpproxyError):
    """No free RTP/RTCP port pair could be bound in the configured range."""


class NftError(RtpproxyError):
    """nft refused a transaction; the message is nft's own, with the fix when we know it."""


class ProtocolError(RtpproxyError):
    """A control command is malformed or refused; code is the protocol's E<n> number."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"E{code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason
