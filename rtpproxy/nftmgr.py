"""nftables: the only importer of `nftables` (python3-nftables / libnftables).

Pure builders render the skeleton (rtpproxy.nft) and return JSON command lists for set
elements; they are golden-tested without root. One executor applies each change as a single
transaction and raises NftError with nft's own message.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Optional

from rtpproxy.errors import NftError

OWN_COMMENT = "rtpproxy"                      # marks the jump rule we insert in chain mode
RPF_COMMENT = "rtpproxy: reverse-path check fails"
COMMENT_MAX = 127                             # nft's userdata limit for comments, minus room


@dataclass(frozen=True)
class NftLayout:
    """Where our objects live and what they match."""

    table: str = "rtpproxy"                   # standalone: `table inet <table>`
    admin_chain: Optional[tuple[str, str, str]] = None   # chain mode: (family, table, base chain)
    min_port: int = 35000
    max_port: int = 65000
    range_policy: str = "drop"                # drop | none
    element_timeout: int = 90                 # seconds
    control_ports: tuple[int, ...] = ()       # UDP control ports inside the media range stay open
    # Ports of the media range the kernel may give other programs as ephemeral ports (the
    # ephemeral range minus ip_local_reserved_ports): dropping them would drop replies to those
    # programs (DNS, ...), so the range drop leaves them out.
    ephemeral: tuple[tuple[int, int], ...] = ()
    kernel: bool = False                      # the kernel tier's maps and chains (rtpproxy-kernel.nft)
    forward_policy: str = "drop"              # kernel tier: drop | accept forwarded traffic that is not ours

    @property
    def family(self) -> str:
        return self.admin_chain[0] if self.admin_chain else "inet"

    @property
    def table_name(self) -> str:
        return self.admin_chain[1] if self.admin_chain else self.table

    @property
    def chain(self) -> str:
        return "rtpproxy" if self.admin_chain else "input"

    @property
    def prefix(self) -> str:
        return "rtpproxy_" if self.admin_chain else ""

    def set_name(self, kind: str) -> str:
        return self.prefix + kind

    @property
    def set_kinds(self) -> tuple[str, ...]:
        return ("media4", "media6", "any4", "any6")


def parse_admin_chain(value: str) -> tuple[str, str, str]:
    """--nft-chain inet:TABLE:CHAIN (e.g. inet:filter:input, Debian's default ruleset). Only inet
    tables: our rules match IPv4 and IPv6 media in one chain."""
    parts = value.split(":")
    if len(parts) != 3 or not all(parts):
        raise ValueError("use inet:TABLE:CHAIN, e.g. inet:filter:input")
    if parts[0] != "inet":
        raise ValueError(f"{parts[0]} tables are not supported, only inet ones (our chain matches IPv4 and "
                         "IPv6); with an ip/ip6 ruleset use the standalone table and accept the media range "
                         "in your own chain")
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Element:
    """One open media socket: local address (wildcard allowed) and port, with its call-id."""

    host: str
    port: int
    call_id: str = ""

    def target(self, layout: NftLayout) -> tuple[str, Any]:
        """(set name, element value) this socket maps to."""
        ip = ipaddress.ip_address(self.host)
        v = "6" if ip.version == 6 else "4"
        if ip.is_unspecified:
            return layout.set_name("any" + v), self.port
        return layout.set_name("media" + v), {"concat": [str(ip), self.port]}


# ---- builders (pure) ---------------------------------------------------------

def skeleton_template(name: str = "rtpproxy.nft") -> str:
    return resources.files("rtpproxy").joinpath(name).read_text()


KERNEL_MAPS = ("kdnat4", "kdnat6", "ksnat4", "ksnat6")
KERNEL_SETS = ("kcount4", "kcount6", "ksock4", "ksock6")
KERNEL_CHAINS = ("kpre", "kpost", "kout", "kforward")
FORWARD_DROP_COMMENT = "rtpproxy: forwarded, not a relayed stream"
CT_MARK = 0x72747070                          # "rtpp": the conntrack mark of kernel-tier entries


def _kernel_block(layout: NftLayout) -> str:
    if not layout.kernel:
        return ""
    rule = (f'\t\tcounter drop comment "{FORWARD_DROP_COMMENT}"' if layout.forward_policy == "drop" else
            "\t\t# --kernel-forward-policy accept: other forwarded traffic is left to the admin's rules")
    return skeleton_template("rtpproxy-kernel.nft").replace("@FORWARD_RULE@", rule).replace("@CT_MARK@",
                                                                                           hex(CT_MARK))


def render_skeleton(layout: NftLayout, template: Optional[str] = None) -> str:
    """The table (standalone) or our objects in the admin's table (chain mode), as nft text."""
    text = template if template is not None else skeleton_template()
    text = text.replace("@KERNEL@", _kernel_block(layout))
    hook = ("\t\ttype filter hook input priority filter - 5; policy accept;" if not layout.admin_chain
            else "\t\t# a regular chain: the admin's chain jumps here")
    control = "\t\t# (no control port inside the media range)"
    inside = sorted(p for p in layout.control_ports if layout.min_port <= p <= layout.max_port)
    if inside:
        ports = ", ".join(str(p) for p in inside)
        control = f'\t\tudp dport {{ {ports} }} counter accept comment "rtpproxy: control port inside the media range"'
    if layout.range_policy == "drop":
        spared = [(lo, hi) for lo, hi in layout.ephemeral if lo <= layout.max_port and hi >= layout.min_port]
        skip = ""
        if spared:
            ranges = ", ".join(f"{max(lo, layout.min_port)}-{min(hi, layout.max_port)}" for lo, hi in spared)
            skip = f"udp dport != {{ {ranges} }} "
        rng = (f"\t\tudp dport {layout.min_port}-{layout.max_port} {skip}counter drop "
               f'comment "rtpproxy: media port outside any call"')
    else:
        rng = "\t\t# --nft-range-policy none: other media ports are left to the admin's rules"
    values = {
        "@FAMILY@": layout.family, "@TABLE@": layout.table_name, "@PREFIX@": layout.prefix,
        "@CHAIN@": layout.chain, "@TIMEOUT@": str(layout.element_timeout), "@HOOK@": hook,
        "@CONTROL_RULE@": control, "@RANGE_RULE@": rng,
        "@MIN_PORT@": str(layout.min_port), "@MAX_PORT@": str(layout.max_port),
    }
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def removal_text(layout: NftLayout, jump_handles: Iterable[int] = ()) -> str:
    """nft text that removes our objects whether or not they exist (create-then-delete is the
    idempotent idiom: both steps are one transaction)."""
    fam, table = layout.family, layout.table_name
    if not layout.admin_chain:
        return f"table {fam} {table}\ndelete table {fam} {table}\n"
    _, _, base = layout.admin_chain
    lines = [f"delete rule {fam} {table} {base} handle {h}" for h in jump_handles]
    for chain in (layout.chain, layout.prefix + "rpcheck"):
        lines += [f"add chain {fam} {table} {chain}", f"delete chain {fam} {table} {chain}"]
    for chain in KERNEL_CHAINS:
        lines += [f"add chain {fam} {table} {layout.prefix}{chain}", f"delete chain {fam} {table} {layout.prefix}{chain}"]
    for kind in layout.set_kinds:
        name = layout.set_name(kind)
        key = {"media4": "ipv4_addr . inet_service", "media6": "ipv6_addr . inet_service"}.get(kind, "inet_service")
        lines += [f"add set {fam} {table} {name} {{ type {key}; flags timeout; }}",
                  f"delete set {fam} {table} {name}"]
    for kind in KERNEL_SETS:
        key = "ipv4_addr . inet_service" if kind.endswith("4") else "ipv6_addr . inet_service"
        flags = " counter;" if kind.startswith("kcount") else ""
        lines += [f"add set {fam} {table} {layout.prefix}{kind} {{ type {key};{flags} }}",
                  f"delete set {fam} {table} {layout.prefix}{kind}"]
    for kind in KERNEL_MAPS:
        addr = "ipv4_addr" if kind.endswith("4") else "ipv6_addr"
        key = f"{addr} . {addr} . inet_service . inet_service : {addr} . inet_service"
        lines += [f"add map {fam} {table} {layout.prefix}{kind} {{ type {key}; }}",
                  f"delete map {fam} {table} {layout.prefix}{kind}"]
    return "\n".join(lines) + "\n"


def setup_text(layout: NftLayout, jump_handles: Iterable[int] = (), template: Optional[str] = None) -> str:
    """One transaction: remove stale state, load the skeleton, hook it in (chain mode)."""
    text = removal_text(layout, jump_handles) + render_skeleton(layout, template)
    if layout.admin_chain:
        fam, table, base = layout.admin_chain
        text += (f'insert rule {fam} {table} {base} meta l4proto udp counter jump {layout.chain} '
                 f'comment "{OWN_COMMENT}"\n')
    return text


def element_commands(layout: NftLayout, op: str, elements: Iterable[Element]) -> list[dict]:
    """JSON commands adding (op='add', with timeout and call-id comment; re-adding refreshes the
    expiry) or deleting (op='delete') elements, grouped into one command per set."""
    by_set: dict[str, list] = {}
    for e in elements:
        name, value = e.target(layout)
        if op == "add":
            item = {"elem": {"val": value, "timeout": layout.element_timeout,
                             "expires": layout.element_timeout, "comment": e.call_id[:COMMENT_MAX]}}
        else:
            item = value
        by_set.setdefault(name, []).append(item)
    return [{op: {"element": {"family": layout.family, "table": layout.table_name, "name": name, "elem": items}}}
            for name, items in sorted(by_set.items())]


def flush_commands(layout: NftLayout) -> list[dict]:
    return [{"flush": {"set": {"family": layout.family, "table": layout.table_name, "name": layout.set_name(k)}}}
            for k in layout.set_kinds]


@dataclass(frozen=True)
class KernelFlow:
    """One stream forwarded in the kernel: packets from `a` to relay socket `a_local` go to `b`
    from relay socket `b_local`, and the reverse (all four in one family)."""

    a: tuple[str, int]
    a_local: tuple[str, int]
    b: tuple[str, int]
    b_local: tuple[str, int]
    call_id: str = ""

    @property
    def v(self) -> str:
        return "6" if ":" in self.a[0] else "4"


def kernel_commands(layout: NftLayout, op: str, flows: Iterable[KernelFlow]) -> list[dict]:
    """JSON commands adding or deleting the map and counter elements of these flows."""
    by_set: dict[str, list] = {}

    def put(kind: str, v: str, key: list, value: Optional[list], comment: str) -> None:
        item: Any = {"concat": key}
        if value is not None:
            item = [item, {"concat": value}]
        if op == "add" and value is None:
            item = {"elem": {"val": item, "comment": comment[:COMMENT_MAX]}}
        by_set.setdefault(f"{layout.prefix}{kind}{v}", []).append(item)

    for f in flows:
        (a, ap), (al, alp), (b, bp), (bl, blp) = f.a, f.a_local, f.b, f.b_local
        put("kdnat", f.v, [a, al, ap, alp], [b, bp], f.call_id)
        put("kdnat", f.v, [b, bl, bp, blp], [a, ap], f.call_id)
        put("ksnat", f.v, [a, b, ap, bp], [bl, blp], f.call_id)
        put("ksnat", f.v, [b, a, bp, ap], [al, alp], f.call_id)
        for kind in ("kcount", "ksock"):
            put(kind, f.v, [al, alp], None, f.call_id)
            put(kind, f.v, [bl, blp], None, f.call_id)
    if op == "add":
        return [{"add": {"element": {"family": layout.family, "table": layout.table_name, "name": name,
                                     "elem": items}}} for name, items in sorted(by_set.items())]
    return [{"delete": {"element": {"family": layout.family, "table": layout.table_name, "name": name,
                                    "elem": [i if not isinstance(i, list) else i[0] for i in items]}}}
            for name, items in sorted(by_set.items())]


def kernel_flush_commands(layout: NftLayout) -> list[dict]:
    cmds = [{"flush": {"map": {"family": layout.family, "table": layout.table_name, "name": layout.prefix + k}}}
            for k in KERNEL_MAPS]
    return cmds + [{"flush": {"set": {"family": layout.family, "table": layout.table_name,
                                      "name": layout.prefix + k}}} for k in KERNEL_SETS]


def parse_kernel_counters(listing: dict) -> dict[tuple[str, int], tuple[int, int]]:
    """(relay address, port) -> (packets, bytes) from a `list set` of kcount4/kcount6."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for item in listing.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []) or []:
            e = elem.get("elem", {}) if isinstance(elem, dict) else {}
            val, counter = e.get("val", {}), e.get("counter") or {}
            concat = val.get("concat") if isinstance(val, dict) else None
            if concat and len(concat) == 2:
                out[(str(ipaddress.ip_address(concat[0])), int(concat[1]))] = (int(counter.get("packets", 0)),
                                                                             int(counter.get("bytes", 0)))
    return out


# ---- reading nft's JSON (pure) --------------------------------------------------

def parse_elements(listing: dict, layout: NftLayout) -> list[Element]:
    """Elements of our sets in a `list table` JSON answer."""
    names = {layout.set_name(k): k for k in layout.set_kinds}
    out = []
    for obj in listing.get("nftables", []):
        s = obj.get("set")
        if not s or s.get("name") not in names:
            continue
        for item in s.get("elem", []):
            e = item.get("elem", item) if isinstance(item, dict) else item
            val = e.get("val", e) if isinstance(e, dict) else e
            comment = e.get("comment", "") if isinstance(e, dict) else ""
            if isinstance(val, dict) and "concat" in val:
                host, port = val["concat"]
            else:
                host = "::" if names[s["name"]].endswith("6") else "0.0.0.0"
                port = val
            out.append(Element(str(host), int(port), comment))
    return out


def parse_counters(listing: dict) -> dict[str, int]:
    """Packets counted by each of our rules, keyed by the rule's comment."""
    out: dict[str, int] = {}
    for obj in listing.get("nftables", []):
        rule = obj.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                out[rule["comment"]] = out.get(rule["comment"], 0) + int(expr["counter"].get("packets", 0))
    return out


def jump_handles(listing: dict, layout: NftLayout) -> list[int]:
    """Handles of our jump rules in the admin's chain (chain mode)."""
    if not layout.admin_chain:
        return []
    base = layout.admin_chain[2]
    return [obj["rule"]["handle"] for obj in listing.get("nftables", [])
            if "rule" in obj and obj["rule"].get("chain") == base and obj["rule"].get("comment") == OWN_COMMENT]


# ---- the executor ----------------------------------------------------------------

class Nft:
    """libnftables through python3-nftables; every call is one transaction."""

    def __init__(self) -> None:
        try:
            import nftables  # noqa: PLC0415 - the one place this module is imported
        except ImportError:
            raise NftError("python3-nftables is not installed: apt-get install python3-nftables nftables, "
                           "or run with --no-nft") from None
        try:
            self._nft = nftables.Nftables()
        except OSError as exc:
            raise NftError(f"libnftables cannot be loaded ({exc}): apt-get install libnftables1, "
                           "or run with --no-nft") from None
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)

    def json(self, commands: list[dict]) -> dict:
        rc, out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(_explain(err))
        return out if isinstance(out, dict) else {}

    def text(self, script: str) -> dict:
        rc, out, err = self._nft.cmd(script)
        if rc != 0:
            raise NftError(_explain(err))
        if isinstance(out, str) and out.strip():
            import json  # noqa: PLC0415

            return json.loads(out)
        return {}

    def list_table(self, family: str, table: str) -> Optional[dict]:
        """The table as JSON, or None if it does not exist."""
        try:
            return self.json([{"list": {"table": {"family": family, "name": table}}}])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise


def _explain(err: str) -> str:
    msg = " ".join(err.strip().split())
    if "Operation not permitted" in msg:
        return (f"{msg} — managing nftables needs CAP_NET_ADMIN: run as root, give the service "
                "AmbientCapabilities=CAP_NET_ADMIN, or pass --no-nft")
    return msg or "nft failed without a message"
