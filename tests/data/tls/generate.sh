#!/usr/bin/env bash
# Regenerates the test certificates (valid for 100 years; test use only, never deploy these keys):
# a CA, a server certificate for localhost and 127.0.0.1 signed by it, a client certificate signed
# by it, another CA with a client certificate of its own (which the first CA's nodes refuse), and
# a self-signed server certificate (as a development node would use, trusted by clients as it
# is), and a self-signed certificate that expired on 2001-01-01 (for the expiry gauge). Needs the
# openssl command.
set -euo pipefail
cd "$(dirname "$0")"
days=36500
ca() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
        -keyout "$1.key" -out "$1.pem" -subj "/CN=$2" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
leaf() { # name, subject, extensions, signing CA
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
    openssl x509 -req -in "$1.csr" -CA "${4:-ca}.pem" -CAkey "${4:-ca}.key" -CAcreateserial \
        -days "$days" -out "$1.pem" -extfile <(printf '%s\n' "$3")
    rm "$1.csr"
}
ca ca "Touchline test CA"
ca other-ca "Another test CA"
leaf server "localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
client="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
leaf client "test-client" "$client"
leaf other-client "another-client" "$client" other-ca
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -keyout self-signed.key -out self-signed.pem -subj "/CN=localhost" \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
    -addext keyUsage=critical,digitalSignature -addext extendedKeyUsage=serverAuth
# `openssl ca` is the one command of OpenSSL 3.0 that takes a validity period in the past.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout expired.key \
    -out expired.csr -subj "/CN=localhost"
expired=$(mktemp -d)
touch "$expired/index.txt"
openssl ca -batch -selfsign -keyfile expired.key -in expired.csr -out expired.pem -notext \
    -create_serial -startdate 20000101000000Z -enddate 20010101000000Z -config <(printf '%s\n' \
    '[ca]' 'default_ca = expired' '[expired]' "dir = $expired" 'database = $dir/index.txt' \
    'new_certs_dir = $dir' 'serial = $dir/serial' 'default_md = sha256' 'policy = any' \
    'x509_extensions = leaf' '[any]' 'commonName = supplied' '[leaf]' \
    'subjectAltName = DNS:localhost,IP:127.0.0.1' 'basicConstraints = critical,CA:FALSE' \
    'keyUsage = critical,digitalSignature' 'extendedKeyUsage = serverAuth')
rm -r "$expired" expired.csr
rm -f ca.srl other-ca.srl ca.key other-ca.key
