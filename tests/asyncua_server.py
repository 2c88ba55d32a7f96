#!/usr/bin/env python3
"""An independent OPC UA server for plantgate's interop tests (tests/interop_asyncua.rs).

Built on the `asyncua` package from PyPI (pip install asyncua), i.e. not on
async-opcua like our simulator. It offers every security policy/mode pair of
docs/configuration.md (None/None; Basic256Sha256, Aes128Sha256RsaOaep, Aes256Sha256RsaPss
each with Sign and SignAndEncrypt), anonymous and/or username/password
identity, and the namespace `urn:plantgate:interop` with a few variables
that change every 100 ms:

    ns=<idx>;s=Line1/Counter   Int32, +1 per tick
    ns=<idx>;s=Line1/Temp      Double, a sine
    ns=<idx>;s=Line1/State     String, RUNNING/IDLE alternating every 10 ticks

Options for fault tests: `--big-string N` adds `Line1/Big`, a String of N
bytes whose content changes every 10 ticks (a value over the decoder's
customary 65 535 limit); `--huge-string N` adds `Line1/Huge`, a String of N
bytes set once (over even a raised limit); `--only-none` offers the
None/None endpoint only, so a password token is not encrypted (the server has
no encrypting policy to offer for it); `--historize` keeps the history of
`Line1/Counter` and `Line1/Temp` in memory (asyncua's own history manager) and
answers HistoryRead for them; `Line1/State` keeps none (a node without
history).

When it serves, it prints one line on stdout and flushes it:

    READY opc.tcp://127.0.0.1:<port>/ ns=<idx>

and it runs until killed (or stdin closes, so an abandoned test never leaves
it behind).
"""

import argparse
import asyncio
import datetime
import math
import socket
import sys
from pathlib import Path

from asyncua import Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

NAMESPACE = "urn:plantgate:interop"
APP_URI = "urn:plantgate:interop:asyncua"


class PasswordUsers:
    """Accepts exactly one username/password; anonymous only if allowed."""

    def __init__(self, user, password, anonymous):
        self.user = user
        self.password = password
        self.anonymous = anonymous

    def get_user(self, iserver, username=None, password=None, certificate=None):
        # No X509 identity tokens are offered: without a username it is an
        # anonymous token (asyncua passes the channel's client certificate).
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        if username == self.user and password == self.password:
            return User(role=UserRole.User, name=username)
        return None


def make_certificate(pki: Path):
    """A self-signed server certificate with the application URI, localhost
    and 127.0.0.1 as subject alternative names (what clients check)."""
    pki.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = pki / "server_cert.der", pki / "server_key.pem"
    if not cert_path.exists() or not key_path.exists():
        key = cert_gen.generate_private_key()
        cert = cert_gen.generate_self_signed_app_certificate(
            key,
            "plantgate interop asyncua",
            {"organizationName": "plantgate tests"},
            [
                x509.UniformResourceIdentifier(APP_URI),
                x509.DNSName("localhost"),
                x509.DNSName(socket.gethostname()),
                x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
            ],
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=30,
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pki", required=True, help="directory for the server certificate")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--no-anonymous", action="store_true")
    parser.add_argument("--big-string", type=int, default=0, help="serve Line1/Big, a String of N bytes")
    parser.add_argument("--huge-string", type=int, default=0, help="serve Line1/Huge, a String of N bytes")
    parser.add_argument("--only-none", action="store_true", help="offer the None/None endpoint only")
    parser.add_argument("--historize", action="store_true", help="keep history of Line1/Counter and Line1/Temp")
    args = parser.parse_args()

    users = PasswordUsers(args.user, args.password, not args.no_anonymous)
    server = Server(user_manager=users)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{args.port}/")
    server.set_server_name("plantgate interop asyncua")
    await server.set_application_uri(APP_URI)
    policies = [
        ua.SecurityPolicyType.NoSecurity,
        ua.SecurityPolicyType.Basic256Sha256_Sign,
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
        ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
    ]
    server.set_security_policy(policies[:1] if args.only_none else policies)
    tokens = [ua.UserNameIdentityToken]
    if not args.no_anonymous:
        tokens.append(ua.AnonymousIdentityToken)
    server.set_identity_tokens(tokens)
    cert_path, key_path = make_certificate(Path(args.pki))
    await server.load_certificate(str(cert_path))
    await server.load_private_key(str(key_path))

    idx = await server.register_namespace(NAMESPACE)
    line = await server.nodes.objects.add_folder(ua.NodeId("Line1", idx), "Line1")
    counter = await line.add_variable(ua.NodeId("Line1/Counter", idx), "Counter", 0, ua.VariantType.Int32)
    temp = await line.add_variable(ua.NodeId("Line1/Temp", idx), "Temp", 20.0, ua.VariantType.Double)
    state = await line.add_variable(ua.NodeId("Line1/State", idx), "State", "IDLE", ua.VariantType.String)
    big = None
    if args.big_string:
        big = await line.add_variable(ua.NodeId("Line1/Big", idx), "Big", "a" * args.big_string, ua.VariantType.String)
    if args.huge_string:
        await line.add_variable(ua.NodeId("Line1/Huge", idx), "Huge", "h" * args.huge_string, ua.VariantType.String)

    async with server:
        if args.historize:
            # Unlimited count, a day back: more than any test needs.
            for node in (counter, temp):
                await server.historize_node_data_change(node, period=datetime.timedelta(days=1), count=0)
        port = server.bserver.port
        print(f"READY opc.tcp://127.0.0.1:{port}/ ns={idx}", flush=True)
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        tick = 0
        while not stdin_closed.done():
            tick += 1
            now = datetime.datetime.now(datetime.timezone.utc)
            await counter.write_value(ua.DataValue(ua.Variant(tick, ua.VariantType.Int32), SourceTimestamp=now))
            await temp.write_value(
                ua.DataValue(ua.Variant(20.0 + 5.0 * math.sin(tick / 10.0), ua.VariantType.Double), SourceTimestamp=now)
            )
            await state.write_value(
                ua.DataValue(
                    ua.Variant("RUNNING" if (tick // 10) % 2 else "IDLE", ua.VariantType.String), SourceTimestamp=now
                )
            )
            if big is not None and tick % 10 == 0:
                fill = "ab"[(tick // 10) % 2]
                await big.write_value(
                    ua.DataValue(ua.Variant(fill * args.big_string, ua.VariantType.String), SourceTimestamp=now)
                )
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
