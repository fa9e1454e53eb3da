"""`python -m releasegate.serving --port N`: the gateway on loopback, configured from the environment."""

import argparse

from releasegate.serving import run

parser = argparse.ArgumentParser(prog="python -m releasegate.serving", description=__doc__)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8765)
args = parser.parse_args()
run(host=args.host, port=args.port)
