"""Control protocols: the legacy rtpproxy protocol (rtpp.py), its commands and transports."""
