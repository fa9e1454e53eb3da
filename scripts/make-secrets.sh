#!/bin/sh
# Fresh secrets for docker-compose.yaml, which refuses to start without them (`make secrets` runs this).
#
#   scripts/make-secrets.sh [DIR]      DIR: where docker-compose.yaml is (default: this repository)
#
# Writes, never overwriting what exists (delete a file, or a folder of deploy/secrets, to make it anew):
#   .env                           passwords, Airflow's JWT and API secrets and Fernet key, the gateway's
#                                  admin key (a variable missing from an existing .env is added)
#   deploy/secrets/ca/ca.pem       a throwaway CA (its key is deleted once it signed the gateway's certificate)
#   deploy/secrets/gateway/        the gateway's TLS certificate (gateway, localhost, 127.0.0.1) and key
#   deploy/secrets/metrics/        metrics.key: the key of role `metrics` Prometheus scrapes /metrics with
#   deploy/secrets/alerts/         alerts.key: the key of role `alerts` Alertmanager posts to /alerts with
#   deploy/secrets/trusted/        release.pub: the public key the stack verifies models with
#   deploy/secrets/signing/        release.key: its private key, for where models are built (the demo
#                                  profile's demo-models, CI); move it there and delete it here
# GATEWAY_TLS_NAMES="models.example.com,10.0.0.5" adds names to the gateway's certificate.
# Needs only openssl.
set -eu

DIR=$(cd "${1:-$(dirname "$0")/..}" && pwd)
ENV_FILE="$DIR/.env"
SECRETS="$DIR/deploy/secrets"
command -v openssl >/dev/null || { echo "make-secrets: openssl is needed" >&2; exit 1; }
umask 077

say() { echo "make-secrets: $*"; }

# The containers run as AIRFLOW_UID: the host user, so they can read the 0600 files made here.
uid=$(id -u)
[ "$uid" -ne 0 ] || uid=50000

hex() { openssl rand -hex 32; }                                     # 256 bits
fernet() { openssl rand 32 | openssl enc -base64 -A | tr '+/' '-_'; }  # Fernet: url-safe base64 of 32 bytes

# --- .env ------------------------------------------------------------------------------------------
if [ ! -e "$ENV_FILE" ]; then
    printf '# docker compose reads this: made by scripts/make-secrets.sh on %s. Keep it private.\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$ENV_FILE"
fi
added=""
add() {  # add VAR=value unless the file sets VAR already
    if ! grep -q "^$1=" "$ENV_FILE"; then
        printf '%s=%s\n' "$1" "$2" >>"$ENV_FILE"
        added="$added $1"
    fi
}
add AIRFLOW_UID "$uid"
add POSTGRES_PASSWORD "$(hex)"
add AIRFLOW_JWT_SECRET "$(hex)"
add AIRFLOW_API_SECRET_KEY "$(hex)"
add AIRFLOW_FERNET_KEY "$(fernet)"
add RELEASEGATE_ADMIN_KEY "$(hex)"
add AIRFLOW_ADMIN_PASSWORD "$(hex)"
add AIRFLOW_OPERATOR_PASSWORD "$(hex)"
add AIRFLOW_VIEWER_PASSWORD "$(hex)"
add GRAFANA_ADMIN_PASSWORD "$(hex)"
if [ -n "$added" ]; then say "$ENV_FILE: added$added"; else say "$ENV_FILE: complete, left as it is"; fi

mkdir -p "$SECRETS"
[ -e "$SECRETS/.gitignore" ] || printf '# Made by scripts/make-secrets.sh: never commit these.\n*\n' >"$SECRETS/.gitignore"

# --- TLS: a throwaway CA and the gateway's certificate ----------------------------------------------
CA="$SECRETS/ca"
GATEWAY="$SECRETS/gateway"
if [ -e "$CA/ca.pem" ] && [ -e "$GATEWAY/tls.crt" ] && [ -e "$GATEWAY/tls.key" ]; then
    say "TLS: $CA/ca.pem and $GATEWAY/tls.crt exist, left as they are"
elif [ -e "$CA/ca.pem" ] || [ -e "$GATEWAY/tls.crt" ] || [ -e "$GATEWAY/tls.key" ]; then
    echo "make-secrets: TLS is half there; delete $CA and $GATEWAY to make a new CA and certificate" >&2
    exit 1
else
    mkdir -p "$CA" "$GATEWAY"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    names="DNS:gateway,DNS:localhost,IP:127.0.0.1"
    for name in $(echo "${GATEWAY_TLS_NAMES:-}" | tr ',' ' '); do
        case "$name" in
            *[!0-9.]*) names="$names,DNS:$name" ;;
            *) names="$names,IP:$name" ;;
        esac
    done
    cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[gateway]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $names
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key"
    openssl req -new -x509 -config "$work/openssl.cnf" -extensions ca -key "$work/ca.key" \
        -subj "/CN=releasegate compose CA $(hex | cut -c1-8)" -days 3650 -sha256 -out "$work/ca.pem"
    openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$work/tls.key"
    openssl req -new -config "$work/openssl.cnf" -key "$work/tls.key" -subj "/CN=gateway" -out "$work/tls.csr"
    openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 \
        -extfile "$work/openssl.cnf" -extensions gateway -out "$work/tls.crt"
    # The CA key is not kept: nobody can issue another certificate this stack trusts.
    mv "$work/tls.key" "$GATEWAY/tls.key"
    mv "$work/tls.crt" "$GATEWAY/tls.crt"
    mv "$work/ca.pem" "$CA/ca.pem"
    chmod 755 "$CA" && chmod 644 "$CA/ca.pem"  # public; Prometheus reads it as another user
    say "TLS: $CA/ca.pem (throwaway CA, key discarded), $GATEWAY/tls.crt for $names"
fi

# --- the gateway's file keys, each for one reader (readable by that container's own user) ------------
# file_key NAME WHAT: deploy/secrets/NAME/NAME.key, a key of role NAME, unless it exists.
file_key() {
    local dir="$SECRETS/$1"
    if [ -e "$dir/$1.key" ]; then
        say "$1: $dir/$1.key exists, left as it is"
    else
        mkdir -p "$dir"
        hex >"$dir/$1.key"
        chmod 755 "$dir" && chmod 644 "$dir/$1.key"  # the key opens its one endpoint and nothing else
        say "$1: $dir/$1.key ($2)"
    fi
}
file_key metrics "the gateway's /metrics key, for Prometheus"
file_key alerts "the gateway's /alerts key, for Alertmanager"

# --- the signing key pair ---------------------------------------------------------------------------
TRUSTED="$SECRETS/trusted"
SIGNING="$SECRETS/signing"
mkdir -p "$TRUSTED"
chmod 755 "$TRUSTED"
if [ -e "$TRUSTED/release.pub" ]; then
    say "signing: $TRUSTED/release.pub exists, left as it is"
else
    mkdir -p "$SIGNING"
    if [ ! -e "$SIGNING/release.key" ]; then
        openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$SIGNING/release.key"
    fi
    openssl pkey -in "$SIGNING/release.key" -pubout -out "$TRUSTED/release.pub"
    chmod 644 "$TRUSTED/release.pub"
    say "signing: $TRUSTED/release.pub (trusted by the stack); its private key $SIGNING/release.key" \
        "belongs where models are built"
fi

if [ "$(id -u)" -eq 0 ]; then
    chown -R "$uid" "$SECRETS" "$ENV_FILE"
fi
