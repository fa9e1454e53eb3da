"""`python -m releasegate.serving --port N`: the gateway on loopback, configured from the environment."""

import argparse

from releasegate.serving import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m releasegate.serving", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--tls-cert", help="Server certificate (PEM); default $RELEASEGATE_GATEWAY_TLS_CERT.")
    parser.add_argument("--tls-key", help="Its private key (PEM); default $RELEASEGATE_GATEWAY_TLS_KEY.")
    parser.add_argument(
        "--tls-client-ca",
        help="Require client certificates signed by this CA (mutual TLS); default $RELEASEGATE_GATEWAY_TLS_CLIENT_CA.",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        help="Gateway processes behind the one port; default $RELEASEGATE_GATEWAY_WORKERS, else one per core.",
    )
    args = parser.parse_args()
    run(
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        workers=args.workers,
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


if __name__ == "__main__":  # importing the module (e.g. a multiprocessing child) must not serve
    main()
