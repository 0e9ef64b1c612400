//! `maeum-coordinator doctor`: checks a coordinator home before (or while) it serves,
//! offline, and says what to fix. Exit 0 when `serve` would start; 1 when a check fails.
//! Safe to run beside a running coordinator: it binds no port, and it opens the state
//! database (checking every record's checksum, the seal and the audit log against the
//! witnessed checkpoint) only when no coordinator holds it.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use ring::signature::KeyPair;

use maeum_pki::identity::{self, PeerId};
use maeum_runtime::doctor::Checks;

use crate::home::{Home, hex, now_ms};

/// Runs every check on the home `dir` and prints them.
pub fn run(dir: &Path, json: bool) -> Result<()> {
    let checks = check(dir);
    checks.finish(json)
}

/// The checks, for the CLI and the tests.
pub fn check(dir: &Path) -> Checks {
    let home = Home::new(dir);
    let mut c = Checks::default();
    let now = now_ms() / 1000;
    if !dir.is_dir() {
        c.fail(
            "home",
            format!("{} is not a directory", dir.display()),
            "run `maeum-coordinator init --home DIR` first",
        );
        return c;
    }
    c.ok("home", dir.display().to_string());
    let consortium = home.consortium();
    let expected = consortium.as_ref().ok().map(|k| PeerId::coordinator(&k.name));
    c.require(
        "consortium",
        consortium.map(|k| format!("{} at {}", k.name, k.address)),
        "restore consortium.json from your backup of the home",
    );
    c.certificate(
        "CA certificate",
        &home.path("ca.pem"),
        now,
        90,
        "plan the move to a new consortium CA before it expires",
    );
    if home.path(crate::ca_rollover::PENDING).exists() {
        c.warn(
            "CA rollover",
            "a rollover of the CA is waiting (ca.handover.json, ca.next.pem, ca.next.key)",
            "restart `maeum-coordinator serve` to apply it (docs/protocols/certificates.md#rolling-over-the-ca)",
        );
    }
    match (home.ca_handovers(), crate::ca_rollover::sites_moved(&home, &|_| false)) {
        (Ok(chain), _) if chain.is_empty() => {}
        (Ok(chain), Ok((moved, total))) if moved == total => c.ok(
            "CA rollover",
            format!(
                "rolled over {} time(s); all {total} approved site(s) hold a certificate of the current CA",
                chain.len()
            ),
        ),
        (Ok(chain), Ok((moved, total))) => c.warn(
            "CA rollover",
            format!(
                "rolled over {} time(s); {moved} of {total} site record(s) in HOME/sites (revoked ones included) hold \
                 a certificate of the current CA; server.pem stays one of the retired CA until every unrevoked site does",
                chain.len()
            ),
            "sites renew onto the new CA at their next heartbeat; a site that stays offline keeps the others waiting \
             (`sites revoke` one that left; docs/protocols/certificates.md#rolling-over-the-ca)",
        ),
        (Err(e), _) | (_, Err(e)) => {
            c.fail("CA rollover", format!("{e:#}"), "restore HOME/ca-handovers.json from your backup")
        }
    }
    let renew = "a running `serve` renews server.pem itself within 30 days of expiry, with the CA key in HOME \
                 (docs/protocols/certificates.md); for a wrong key or identity, restore server.pem and server.key \
                 from your backup";
    if let Some(der) = c.certificate("server certificate", &home.path("server.pem"), now, 30, renew) {
        let key = home.read("server.key").map(identity::SecretPem::new);
        let names = expected.transpose().ok().flatten();
        match key.and_then(|k| Ok(identity::key_matches_cert(&k, &der)?)) {
            Ok(true) => c.ok("server key", "server.key matches server.pem"),
            Ok(false) => c.fail("server key", "server.key does not match server.pem", renew),
            Err(e) => c.fail("server key", format!("{e:#}"), "restore server.key from your backup"),
        }
        match (names, PeerId::from_cert_der(&der)) {
            (Some(want), Ok(found)) if want == found => c.ok("server identity", found.to_string()),
            (Some(want), Ok(found)) => {
                c.fail("server identity", format!("server.pem names {found}, not {want}"), renew)
            }
            (_, Err(e)) => c.fail("server identity", e.to_string(), renew),
            (None, Ok(found)) => c.warn("server identity", format!("{found} (consortium unknown)"), ""),
        }
    }
    let signing = home.signing_key().and_then(|k| {
        let public = hex(k.public_key().as_ref());
        let published = home.read("signing.pub")?;
        if published.trim() == public {
            Ok(format!("Ed25519 key {}… (matches signing.pub)", &public[..16]))
        } else {
            Err(anyhow!("signing.pub does not hold signing.key's public key"))
        }
    });
    c.require("signing key", signing, "restore signing.key and signing.pub from your backup (sites trust this key)");
    if home.path(crate::signing_key::PENDING).exists() {
        c.warn(
            "signing key",
            "a rotation is waiting (signing.handover.json, signing.next.key)",
            "restart `maeum-coordinator serve` to apply it (docs/protocols/audit-log.md#rotating-the-log-key)",
        );
    }
    match (home.release_keys(), home.release_key_file()) {
        (Ok(None), _) => c.ok("release key", "none (a consortium from before release keys: one signature a release)"),
        (Ok(Some(keys)), Ok(Some(k))) if k.public_key().as_ref() == keys.current => c.warn(
            "release key",
            format!(
                "release.key {}… is on this host: a compromised host could sign releases",
                &hex(&keys.current)[..16]
            ),
            "move release.key to another machine and sign releases there (`models sign`; docs/protocols/releases.md)",
        ),
        (Ok(Some(keys)), Ok(Some(k))) if keys.all().iter().any(|old| k.public_key().as_ref() == old) => c.warn(
            "release key",
            format!(
                "release.key is a retired release key ({} rotation(s)); the current one is {}…",
                keys.chain.len(),
                &hex(&keys.current)[..16]
            ),
            "delete the retired HOME/release.key, or put the current key there for the coordinator to sign releases",
        ),
        (Ok(Some(_)), Ok(Some(_))) => c.fail(
            "release key",
            "release.key is none of the consortium's release keys (release.pub, release-keys.json)",
            "restore them from your backup",
        ),
        (Ok(Some(keys)), Ok(None)) => {
            let rotated = match keys.chain.len() {
                0 => String::new(),
                n => format!(", after {n} rotation(s)"),
            };
            c.ok(
                "release key",
                format!("{}… kept off this host{rotated}; releases wait for `models sign`", &hex(&keys.current)[..16]),
            );
        }
        (Err(e), _) | (_, Err(e)) => {
            c.fail("release key", format!("{e:#}"), "restore release.pub and release-keys.json from your backup")
        }
    }
    c.writable("state", &home.state());
    if let Some(signing) = signing_key_bytes(&home) {
        state(&mut c, &home, consortium_name(&home).as_deref(), &signing);
    }
    c.writable("model blobs", &home.blobs());
    c.writable("uploads", &home.uploads());
    c.disk_space("disk space", dir, 2048, 256);
    match sites(&home, now) {
        Ok(list) if list.is_empty() => {
            c.warn("sites", "no site approved yet", "approve sites with `maeum-coordinator sites approve REQUEST`")
        }
        Ok(list) => {
            for (site, level) in list {
                match level {
                    Ok(days) if days < 30 => c.warn(
                        &format!("site {site}"),
                        format!("certificate expires in {days} days"),
                        "have the site make a new request and approve it again",
                    ),
                    Ok(days) => c.ok(&format!("site {site}"), format!("certificate valid for {days} more days")),
                    Err(e) => c.fail(&format!("site {site}"), e, "approve the site again"),
                }
            }
        }
        Err(e) => c.fail("sites", format!("{e:#}"), "check HOME/sites is readable"),
    }
    c
}

fn signing_key_bytes(home: &Home) -> Option<Vec<u8>> {
    std::fs::read(home.path("signing.key")).ok()
}

fn consortium_name(home: &Home) -> Option<String> {
    home.consortium().ok().map(|k| k.name)
}

/// Opens the state database and the audit log as `serve` would, read for read.
fn state(c: &mut Checks, home: &Home, consortium: Option<&str>, signing: &[u8]) {
    let dir = home.state();
    if !dir.join("db").exists() && !dir.join(crate::storage::REDB_FILE).exists() {
        c.warn("state database", "none yet", "`serve` creates it");
        return;
    }
    let restore = "stop: do not serve from this home; restore HOME/state (and HOME/state.seal) from a backup                    (docs/guides/consortium-lead.md, Backups)";
    match crate::store::Store::open(&dir, crate::storage::Engine::Sled) {
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("is in use by another process") {
                c.warn("state database", "in use by a running coordinator: not checked", "stop it to check the store");
            } else {
                c.fail("state database", text, restore);
            }
        }
        Ok(store) => {
            let r = store.db().report().clone();
            c.ok(
                "state database",
                format!(
                    "{}: {} commits, {} records, every checksum and the seal verified",
                    r.engine, r.commits, r.records
                ),
            );
            let Some(name) = consortium else { return };
            let retired = home.retired_log_keys().unwrap_or_default();
            match crate::audit::AuditLog::open(store.db(), format!("maeum/{name}"), signing, &retired) {
                Ok(log) => {
                    let w = store.db().witnessed().map_or("no checkpoint cosigned yet".to_owned(), |w| {
                        format!("consistent with the checkpoint of {} entries that site {} cosigned", w.size, w.site)
                    });
                    c.ok("audit log", format!("{} entries, {w}", log.size()))
                }
                Err(e) => c.fail("audit log", format!("{e:#}"), restore),
            }
        }
    }
}

/// Each approved site's certificate: days left, or what is wrong with it.
fn sites(home: &Home, now: i64) -> Result<Vec<(String, Result<i64, String>)>> {
    let Ok(dir) = std::fs::read_dir(home.sites()) else { return Ok(Vec::new()) };
    let ca = home.trusted_cas_pem()?;
    let mut out = Vec::new();
    for e in dir {
        let e = e.context("reading HOME/sites")?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(site) = name.strip_suffix(".pem") else { continue };
        let result = std::fs::read_to_string(e.path())
            .map_err(|e| e.to_string())
            .and_then(|pem| identity::pem_to_der(&pem).map_err(|e| e.to_string()))
            .and_then(|der| {
                let der = der.first().ok_or("no certificate")?.to_vec();
                let t = identity::not_after_unix(&der).map_err(|e| e.to_string())?;
                if t <= now {
                    return Err(format!("certificate expired {} days ago", (now - t) / 86_400));
                }
                let id = PeerId::site(site).map_err(|e| e.to_string())?;
                identity::verify_peer_cert(&ca, &der, &id).map_err(|e| e.to_string())?;
                Ok((t - now) / 86_400)
            });
        out.push((site.to_owned(), result));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_runtime::doctor::Level;

    fn level(c: &Checks, name: &str) -> Level {
        c.checks.iter().find(|x| x.name == name).unwrap_or_else(|| panic!("no check {name}")).level
    }

    #[test]
    fn a_fresh_home_passes_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("coord");
        crate::home::init(&home, "heart", "127.0.0.1:7443", crate::storage::Engine::Sled).expect("init");
        let c = check(&home);
        assert_eq!(c.failures(), 0, "{:#?}", c.checks);
        assert_eq!(level(&c, "sites"), Level::Warn, "no site approved yet");
        // A signing.pub that does not match, and a server key from elsewhere.
        std::fs::write(home.join("signing.pub"), "00".repeat(32)).expect("write");
        let (other, _) = identity::site_request("x").expect("key");
        std::fs::write(home.join("server.key"), other.expose()).expect("write");
        let c = check(&home);
        assert_eq!(level(&c, "signing key"), Level::Fail);
        assert_eq!(level(&c, "server key"), Level::Fail);
        assert!(c.checks.iter().all(|x| !x.detail.contains("PRIVATE KEY")), "no key material in messages");
        let c = check(&dir.path().join("missing"));
        assert_eq!(level(&c, "home"), Level::Fail);
    }

    #[test]
    fn the_state_database_is_opened_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("coord");
        crate::home::init(&home, "heart", "127.0.0.1:7443", crate::storage::Engine::Redb).expect("init");
        {
            let store = crate::store::Store::open(&home.join("state"), crate::storage::Engine::Sled).expect("open");
            assert_eq!(store.db().report().engine, "redb", "init chose the engine");
            assert_eq!(store.next("job").expect("next"), 1);
            // While a coordinator holds it, the doctor says so and checks nothing.
            let c = check(&home);
            assert_eq!(level(&c, "state database"), Level::Warn, "{:#?}", c.checks);
        }
        let c = check(&home);
        assert_eq!(level(&c, "state database"), Level::Ok, "{:#?}", c.checks);
        assert_eq!(level(&c, "audit log"), Level::Ok);
        // A seal that recorded more commits than the database holds: rolled back.
        let seal = home.join("state.seal");
        let text = std::fs::read_to_string(&seal).expect("seal").replace("\"commits\": 1", "\"commits\": 9");
        std::fs::write(&seal, text).expect("write");
        let c = check(&home);
        assert_eq!(level(&c, "state database"), Level::Fail);
        let detail = &c.checks.iter().find(|x| x.name == "state database").expect("check").detail;
        assert!(detail.contains("rolled back"), "{detail}");
    }
}
