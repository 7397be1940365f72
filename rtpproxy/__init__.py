"""rtpproxy: a media relay for SIP platforms speaking the rtpproxy control protocol."""

__version__ = "0.1.0"
