#!/usr/bin/env bash
# The crate boundaries that keep the protocol cores sans-IO and the auditor's verifier
# small: `cargo tree -p CRATE -e normal` (what the crate's library or binary links,
# with only its own features) must list none of the crates that serve or train.
# Exit 1 and name the offenders if one does. Resolves only; compiles nothing.
# Run by .ci/run and by tests/tests/boundaries.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Async runtime and servers, ML, and the Maeum crates that bring them.
forbidden='^(tokio|tonic|axum|hyper|burn|burn-.*|maeum-models|maeum-protocols|maeum-runtime)$'
status=0
for crate in maeum-secagg maeum-tlog maeum-auditor; do
    deps=$("${CARGO:-cargo}" tree --locked -p "$crate" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
    if ! grep -qx "$crate" <<<"$deps"; then
        echo "boundaries: cargo tree did not list $crate itself" >&2
        status=1
        continue
    fi
    bad=$(grep -E "$forbidden" <<<"$deps" | tr '\n' ' ' || true)
    if [ -n "$bad" ]; then
        echo "boundaries: $crate must not depend on: $bad(see its crate docs and ARCHITECTURE.md)" >&2
        status=1
    else
        echo "boundaries: $crate ok ($(wc -l <<<"$deps") crates, none that serve or train)"
    fi
done
exit $status
