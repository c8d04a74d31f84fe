"""Loopback stand-ins for the CAVE services the lookup and caveclient talk to.

Each serves only the documented HTTP contract that the real client library calls
(read from middle_auth_client/decorators.py and caveclient's endpoints.py), on
127.0.0.1 and a free port, and records every request so tests can see what the real
libraries asked:

- auth (HTTPS, as middle-auth-client always uses ``https://{AUTH_URL}``):
  ``GET /auth/api/v1/user/cache`` (Bearer token -> the user's permissions),
  ``GET /auth/api/v1/service/<ns>/table/<table>/dataset`` (table -> dataset name),
  ``GET /auth/api/v1/authorize`` (the browser login page a redirect lands on).
- info (HTTP): ``GET /info/api/v2/datastack/full/<name>``.
"""

from __future__ import annotations

import datetime
import ipaddress
import threading
from dataclasses import dataclass, field
from pathlib import Path

import flask
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from werkzeug.serving import make_server

HOST = "127.0.0.1"


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "l2cache test auth")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "auth-cert.pem", directory / "auth-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class StandIn:
    """A Flask app served on loopback in a thread; ``requests`` lists (method, path)."""

    app: flask.Flask
    ssl: tuple[Path, Path] | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        @self.app.before_request
        def record():
            auth = flask.request.headers.get("Authorization")
            self.requests.append((flask.request.method, flask.request.path, auth))

        ctx = None
        if self.ssl:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.ssl[0]), str(self.ssl[1]))
        self.server = make_server(HOST, 0, self.app, threaded=True, ssl_context=ctx)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path: str, token: str | None = None) -> int:
        return sum(
            1
            for _, p, auth in self.requests
            if p == path and (token is None or auth == f"Bearer {token}")
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


def auth_service(users: dict[str, dict], tables: dict[tuple[str, str], str], ssl) -> StandIn:
    """``users``: token -> permissions_v2 ({dataset: [permission]}); ``tables``:
    (service namespace, table id) -> dataset."""
    app = flask.Flask("auth-standin")

    def token() -> str | None:
        header = flask.request.headers.get("Authorization", "")
        return header.split(" ", 1)[1] if header.startswith("Bearer ") else None

    @app.get("/auth/api/v1/user/cache")
    def user_cache():
        perms = users.get(token() or "")
        if perms is None:
            return flask.jsonify({"error": "invalid token"}), 401
        return flask.jsonify(
            {
                "id": 7,
                "name": "tester",
                "email": "tester@example.org",
                "admin": False,
                "groups": ["testers"],
                "service_account": False,
                "permissions_v2": perms,
                "permissions_v2_ignore_tos": perms,
                "missing_tos": [],
                "datasets_admin": [],
            }
        )

    @app.get("/auth/api/v1/service/<namespace>/table/<table_id>/dataset")
    def dataset(namespace, table_id):
        if token() not in users:
            return flask.jsonify({"error": "invalid token"}), 401
        name = tables.get((namespace, table_id))
        if name is None:
            return flask.jsonify({"error": "no such table"}), 404
        return flask.jsonify(name)

    @app.get("/auth/api/v1/authorize")
    def authorize():
        return "<html><body>CAVE login</body></html>"

    return StandIn(app, ssl=ssl)


def info_service(datastacks: dict[str, dict]) -> StandIn:
    app = flask.Flask("info-standin")

    @app.get("/info/api/v2/datastack/full/<name>")
    def datastack(name):
        if name not in datastacks:
            return flask.jsonify({"message": f"no datastack {name}"}), 404
        return flask.jsonify(datastacks[name])

    return StandIn(app)
