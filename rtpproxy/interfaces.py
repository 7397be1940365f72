"""Local media addresses ("interfaces"): how -l/-6 values are written, and which one a side of a
session uses. Pure functions.

Forms accepted by -l and -6 (repeatable):
  ADDR                    rtpproxy: one address ('*' = any)
  INTERNAL/EXTERNAL       rtpproxy bridge mode: two addresses, named internal and external
  NAME/ADDR[!ADVERTISED]  rtpengine style: a named interface, optionally advertised differently
  LABEL@ADDR[=ADVERTISED] rtpproxy's labels (chosen with the L{label} modifier)
-A ADV[/ADV2] gives the advertised addresses of the plain and bridge forms.
"""
from __future__ import annotations

import ipaddress
from typing import Optional, Sequence

from rtpproxy.config import Bind, numeric_host
from rtpproxy.errors import ConfigError

INTERNAL, EXTERNAL = "internal", "external"


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
        return True
    except ValueError:
        return value == "*"


def parse_one(value: str, flag: str, version: int, advertised: Optional[str] = None) -> list[Bind]:
    """One -l (version 4) or -6 (version 6) value; named forms may hold either family."""
    if "@" in value:
        label, _, rest = value.partition("@")
        addr, _, adv = rest.partition("=")
        if not label:
            raise ConfigError(flag, f"{value!r}: LABEL@ADDR needs a label")
        return [Bind(numeric_host(addr, flag, None), numeric_host(adv, "-A", None) if adv else None, label)]
    left, slash, right = value.partition("/")
    if slash and not _is_ip(left):
        addr, _, adv = right.partition("!")
        if not left.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(flag, f"{value!r}: interface names are letters, digits, - and _")
        return [Bind(numeric_host(addr, flag, None), numeric_host(adv, "-A", None) if adv else None, left)]
    hosts = value.split("/")
    advs = advertised.split("/") if advertised else []
    if len(hosts) > 2 or len(advs) > len(hosts):
        raise ConfigError(flag, f"{value!r}: use ADDR, INTERNAL/EXTERNAL, NAME/ADDR[!ADV] or LABEL@ADDR[=ADV]")
    names = [INTERNAL, EXTERNAL] if len(hosts) == 2 else [""]
    out = []
    for i, h in enumerate(hosts):
        addr, _, adv = h.partition("!")
        adv = adv or (advs[i] if i < len(advs) else "")
        out.append(Bind(numeric_host(addr, flag, version), numeric_host(adv, "-A", None) if adv else None, names[i]))
    return out


def parse_all(values: Sequence[str], flag: str, version: int, advertised: Optional[str]) -> list[Bind]:
    binds = [b for v in values for b in parse_one(v, flag, version, advertised)]
    seen = set()
    for b in binds:
        key = (b.name, b.is_v6)
        if b.name and key in seen:
            raise ConfigError(flag, f"interface name {b.name!r} is used twice for the same address family")
        seen.add(key)
    return binds


def select(binds: Sequence[Bind], want_v6: bool, letter: Optional[str]) -> Optional[Bind]:
    """The interface for one side: by bridge letter (I = internal, E = external; among same-named
    ones the family asked for wins), else the first of the family asked for."""
    if letter:
        name = INTERNAL if letter == "I" else EXTERNAL
        named = [b for b in binds if b.name == name]
        if named:
            same = [b for b in named if b.is_v6 == want_v6]
            return (same or named)[0]
        family = [b for b in binds if b.is_v6 == want_v6] or list(binds)
        pos = 0 if letter == "I" else 1
        if len(family) > pos:
            return family[pos]
    family = [b for b in binds if b.is_v6 == want_v6]
    return family[0] if family else None


def by_name_or_address(binds: Sequence[Bind], value: str) -> Optional[Bind]:
    """L{label} / L<addr> / R's resolved source: the interface with that name or address."""
    if value.startswith("{") and value.endswith("}"):
        name = value[1:-1]
        return next((b for b in binds if b.name == name), None)
    return next((b for b in binds if value in (b.host, b.advertised)), None)


def has_bridge(binds: Sequence[Bind]) -> bool:
    """Bridge letters (E/I) are allowed when there is more than one interface of a family, or
    interfaces named internal/external."""
    v4 = sum(1 for b in binds if not b.is_v6)
    v6 = sum(1 for b in binds if b.is_v6)
    return v4 > 1 or v6 > 1 or any(b.name in (INTERNAL, EXTERNAL) for b in binds)
