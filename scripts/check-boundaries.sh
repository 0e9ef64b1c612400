#!/usr/bin/env bash
# The crate boundaries that keep the protocol cores sans-IO and the auditor's verifier
# small: `cargo tree -p CRATE -e normal` (what the crate's library or binary links,
# with only its own features) must list none of the crates that serve or train.
# Exit 1 and name the offenders if one does. Also: the coordinator and the site must
# resolve the burn stack (burn and everything under it) with the same features, so the
# demo's first run builds it once, not twice (issue 20). Resolves only; compiles nothing.
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

# One burn stack: every package under `burn` with the same features in both binaries.
features() {
    "${CARGO:-cargo}" tree --locked -p "$1" -e normal,build --prefix none --format '{p} [{f}]' | sed 's/ (\*)$//' | sort -u
}
stack=$("${CARGO:-cargo}" tree --locked -p burn -e normal,build --prefix none --format '{p}' | awk '{print $1" "$2}' | sort -u)
in_stack() { awk 'NR==FNR { keep[$1" "$2] = 1; next } ($1" "$2) in keep' <(echo "$stack") -; }
coordinator=$(features maeum-coordinator | in_stack)
site=$(features maeum-site | in_stack)
if [ "$coordinator" != "$site" ]; then
    echo "boundaries: the coordinator and the site resolve the burn stack with different features, so the" >&2
    echo "  first run compiles it twice; ask for the differing features in models/Cargo.toml:" >&2
    diff <(echo "$coordinator") <(echo "$site") | grep '^[<>]' | sed 's/^</  coordinator:/; s/^>/  site:       /' >&2
    status=1
else
    echo "boundaries: coordinator and site share one burn stack ($(wc -l <<<"$site") packages, the same features)"
fi
exit $status
