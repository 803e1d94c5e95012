#!/usr/bin/env python3
"""Mints an HS256 JWT for the demo (standard library only).

    scripts/jwt.py --secret S --role authenticated --sub UUID [--ttl SECONDS]
"""
import argparse
import base64
import hashlib
import hmac
import json
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(secret: str, claims: dict) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--role", required=True)
    parser.add_argument("--sub")
    parser.add_argument("--ttl", type=int, default=30 * 24 * 3600, help="seconds until exp")
    args = parser.parse_args()
    now = int(time.time())
    claims = {"role": args.role, "iat": now, "exp": now + args.ttl}
    if args.sub:
        claims["sub"] = args.sub
    print(mint(args.secret, claims))


if __name__ == "__main__":
    main()
