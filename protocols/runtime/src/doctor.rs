//! What `maeum-coordinator doctor` and `maeum-site doctor` share: a list of checks,
//! each ok, a warning or a failure with what to do about it, printed for people or as
//! JSON; and the checks both homes need (certificates, writable directories, disk
//! space). A doctor never prints secrets: it names files, never their contents.

use std::path::Path;

use serde::Serialize;

use maeum_pki::identity;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One check: what was checked, what was found, and (unless ok) what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

/// The checks of one run, in order.
#[derive(Debug, Default, Serialize)]
pub struct Checks {
    pub checks: Vec<Check>,
}

impl Checks {
    pub fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Level::Ok, detail.into(), String::new());
    }

    pub fn warn(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Level::Warn, detail.into(), fix.into());
    }

    pub fn fail(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Level::Fail, detail.into(), fix.into());
    }

    fn push(&mut self, name: &str, level: Level, detail: String, fix: String) {
        self.checks.push(Check { name: name.to_owned(), level, detail, fix });
    }

    /// Records `result` as ok (with its detail) or as a failure with `fix`.
    pub fn require<T>(&mut self, name: &str, result: anyhow::Result<T>, fix: &str) -> Option<T>
    where
        T: std::fmt::Display,
    {
        match result {
            Ok(v) => {
                self.ok(name, v.to_string());
                Some(v)
            }
            Err(e) => {
                self.fail(name, format!("{e:#}"), fix);
                None
            }
        }
    }

    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| c.level == Level::Fail).count()
    }

    /// Prints the checks; an error (exit 1) if any failed.
    pub fn finish(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
        } else {
            for c in &self.checks {
                let tag = match c.level {
                    Level::Ok => "ok  ",
                    Level::Warn => "WARN",
                    Level::Fail => "FAIL",
                };
                println!("{tag}  {:<22} {}", c.name, c.detail);
                if !c.fix.is_empty() {
                    println!("      {:<22} → {}", "", c.fix);
                }
            }
            let warnings = self.checks.iter().filter(|c| c.level == Level::Warn).count();
            let plural = if warnings == 1 { "warning" } else { "warnings" };
            println!("{} checks: {} failed, {warnings} {plural}", self.checks.len(), self.failures());
        }
        match self.failures() {
            0 => Ok(()),
            n => anyhow::bail!("{n} check(s) failed"),
        }
    }

    /// A certificate file's validity: fails if expired or unreadable, warns within
    /// `warn_days` of expiry. Returns its DER on success.
    pub fn certificate(&mut self, name: &str, path: &Path, now_s: i64, warn_days: i64, renew: &str) -> Option<Vec<u8>> {
        let der = std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|pem| Ok(identity::pem_to_der(&pem)?.remove(0).to_vec()));
        let der = match der {
            Ok(d) => d,
            Err(e) => {
                self.fail(name, format!("{}: {e:#}", path.display()), renew);
                return None;
            }
        };
        match identity::not_after_unix(&der) {
            Ok(t) if t <= now_s => {
                self.fail(name, format!("{} expired {} days ago", path.display(), (now_s - t) / 86_400), renew)
            }
            Ok(t) if t - now_s < warn_days * 86_400 => {
                self.warn(name, format!("{} expires in {} days", path.display(), (t - now_s) / 86_400), renew)
            }
            Ok(t) => self.ok(name, format!("{} valid for {} more days", path.display(), (t - now_s) / 86_400)),
            Err(e) => self.fail(name, format!("{}: {e}", path.display()), renew),
        }
        Some(der)
    }

    /// Whether the daemon can write in `dir` (created if missing): writes and removes a
    /// probe file.
    pub fn writable(&mut self, name: &str, dir: &Path) {
        let probe = dir.join(format!(".doctor-{}", std::process::id()));
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&probe, b"probe"))
            .and_then(|()| std::fs::remove_file(&probe));
        match result {
            Ok(()) => self.ok(name, format!("{} is writable", dir.display())),
            Err(e) => self.fail(
                name,
                format!("{}: {e}", dir.display()),
                "give the service user write access to it (the daemon keeps its state there)",
            ),
        }
    }

    /// Free space on the file system holding `dir`: fails under `fail_mib`, warns
    /// under `warn_mib`.
    pub fn disk_space(&mut self, name: &str, dir: &Path, warn_mib: u64, fail_mib: u64) {
        match rustix::fs::statvfs(dir) {
            Ok(s) => {
                let free = s.f_bavail.saturating_mul(s.f_frsize) >> 20;
                let detail = format!("{free} MiB free on the file system of {}", dir.display());
                let fix = "free space or move HOME to a larger volume (models, updates and the log grow)";
                if free < fail_mib {
                    self.fail(name, detail, fix);
                } else if free < warn_mib {
                    self.warn(name, detail, fix);
                } else {
                    self.ok(name, detail);
                }
            }
            Err(e) => self.warn(name, format!("{}: {e}", dir.display()), "check the volume is mounted"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use maeum_pki::identity::Ca;

    #[test]
    fn certificate_expiry_levels_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("heart", 10).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert_pem()).unwrap();
        let now = crate::runtime::now_ms() / 1000;
        let mut checks = Checks::default();
        assert!(checks.certificate("ca", &path, now, 5, "renew").is_some());
        assert!(checks.certificate("ca", &path, now, 30, "renew").is_some());
        assert!(checks.certificate("ca", &path, now + 11 * 86_400, 30, "renew").is_some());
        assert!(checks.certificate("ca", &dir.path().join("missing.pem"), now, 30, "renew").is_none());
        let levels: Vec<Level> = checks.checks.iter().map(|c| c.level).collect();
        assert_eq!(levels, [Level::Ok, Level::Warn, Level::Fail, Level::Fail]);
        assert!(checks.checks[2].detail.contains("expired"), "{:?}", checks.checks[2]);
        assert_eq!(checks.failures(), 2);
        assert!(checks.finish(true).is_err());
        assert!(!checks.checks.iter().any(|c| c.detail.contains("BEGIN")), "no PEM contents in messages");
    }

    #[test]
    fn writable_and_disk_space() {
        let dir = tempfile::tempdir().unwrap();
        let mut checks = Checks::default();
        checks.writable("state", &dir.path().join("state"));
        checks.disk_space("disk", dir.path(), 1, 0);
        checks.disk_space("disk", dir.path(), u64::MAX, u64::MAX);
        let levels: Vec<Level> = checks.checks.iter().map(|c| c.level).collect();
        assert_eq!(levels, [Level::Ok, Level::Ok, Level::Fail]);
        checks.writable("blocked", &dir.path().join("state/.doctor-probe-is-a-file/x"));
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        checks.writable("blocked", &dir.path().join("file/sub"));
        assert_eq!(checks.checks.last().unwrap().level, Level::Fail);
    }
}
